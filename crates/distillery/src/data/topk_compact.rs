//! The compact top-K sidecar (`kd-generate --store-logits K --logits-format compact`,
//! `<out>.logits.topk`): about 111 bytes per token at K = 64 on a 4k vocabulary, against
//! 386 for the safetensors sidecar (docs/BENCHMARKS.md). Layout (docs/FORMATS.md; `scripts/read_topk.py` reads
//! it):
//!
//! ```text
//! header  "DSTLTOPK" | u32 n | n bytes of JSON {"format", "version", "k", "step"}
//! blocks  one per record: b'B' | u32 rows | u32 payload bytes | u64 FNV-1a of payload | payload
//! index   b'I' | per block: u64 offset of its b'B' | u64 first row | u32 rows
//! footer  u64 offset of the index | u64 blocks | "DSTLEND1"
//! ```
//! (integers little-endian). A block's payload is a bit stream (least significant bit
//! first) of its rows, each: the tail log-mass as its float16 bits (16 bits); the K token ids
//! sorted ascending as Rice-coded gaps (5-bit parameter, then `id[0]`, `id[i] - id[i-1] - 1`);
//! the log-probabilities quantised to `Q = round(-logprob / step)` as `Qmax` (16 bits) and the
//! Rice-coded `Qmax - Q` of each id in the same order (5-bit parameter). A Rice code of `x`
//! with parameter `r` is `x >> r` ones, a zero and the low `r` bits of `x`; a quotient of 32
//! or more is written as 32 ones and `x` in 32 bits. Decoding puts a row's entries most
//! likely first (ties by id); a log-probability comes back within `step / 2` of the stored
//! float16 value, the tail log-mass exactly. Blocks are independent: kd-merge copies them,
//! and a reader seeks to any record through the index (or streams the blocks in order).
use crate::base::io::fnv64;
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 8] = b"DSTLTOPK";
const END: &[u8; 8] = b"DSTLEND1";
const FOOTER: u64 = 24;
const INDEX_ENTRY: usize = 20;
/// Quantisation step of the log-probabilities (nats): 1/16, errors at most 1/32.
pub const DEFAULT_STEP: f64 = 1.0 / 16.0;
const ESCAPE: u64 = 32;

/// One record's rows as plain vectors: `ids` and `logprobs` `[rows * k]` (most likely first
/// per row), `tail` `[rows]` (float16 values).
#[derive(Clone, Debug, PartialEq)]
pub struct PlainRows {
    pub k: usize,
    pub ids: Vec<i64>,
    pub logprobs: Vec<f32>,
    pub tail: Vec<f32>,
}

impl PlainRows {
    pub fn rows(&self) -> usize {
        self.tail.len()
    }
}

struct BitWriter {
    bytes: Vec<u8>,
    acc: u64,
    n: u32,
}

impl BitWriter {
    fn new() -> BitWriter {
        BitWriter { bytes: vec![], acc: 0, n: 0 }
    }

    fn put(&mut self, value: u64, bits: u32) {
        debug_assert!(bits <= 32 && (bits == 32 || value < 1 << bits));
        self.acc |= value << self.n;
        self.n += bits;
        while self.n >= 8 {
            self.bytes.push(self.acc as u8);
            self.acc >>= 8;
            self.n -= 8;
        }
    }

    fn rice(&mut self, x: u64, r: u32) {
        let q = x >> r;
        if q < ESCAPE {
            for _ in 0..q {
                self.put(1, 1);
            }
            self.put(0, 1);
            self.put(x & ((1 << r) - 1), r);
        } else {
            for _ in 0..ESCAPE {
                self.put(1, 1);
            }
            self.put(x, 32);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        if self.n > 0 {
            self.bytes.push(self.acc as u8);
        }
        self.bytes
    }
}

fn rice_bits(x: u64, r: u32) -> u64 {
    let q = x >> r;
    if q < ESCAPE { q + 1 + r as u64 } else { ESCAPE + 32 }
}

/// The Rice parameter (0..=24) that codes `xs` in the fewest bits.
fn best_rice(xs: &[u64]) -> u32 {
    (0..=24).min_by_key(|&r| xs.iter().map(|&x| rice_bits(x, r)).sum::<u64>()).unwrap()
}

struct BitReader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl BitReader<'_> {
    fn get(&mut self, bits: u32) -> Result<u64> {
        let mut v = 0u64;
        for i in 0..bits {
            let (byte, bit) = (self.pos / 8, self.pos % 8);
            let b = *self.bytes.get(byte).context("the payload ends inside a row")?;
            v |= (((b >> bit) & 1) as u64) << i;
            self.pos += 1;
        }
        Ok(v)
    }

    fn rice(&mut self, r: u32) -> Result<u64> {
        let mut q = 0;
        while q < ESCAPE && self.get(1)? == 1 {
            q += 1;
        }
        if q == ESCAPE {
            return self.get(32);
        }
        Ok((q << r) | self.get(r)?)
    }
}

/// float16 bits of a value that float16 represents exactly (a stored tail log-mass).
pub fn f16_bits(x: f32) -> u16 {
    half_bits(x)
}

fn half_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32;
    let man = b & 0x7f_ffff;
    if exp == 0xff {
        return sign | 0x7c00 | if man != 0 { 0x200 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        if e < -10 {
            return sign;
        }
        let m = man | 0x80_0000;
        let shift = (14 - e) as u32;
        let half = 1u32 << (shift - 1);
        let mut v = m >> shift;
        let rest = m & ((1 << shift) - 1);
        if rest > half || (rest == half && v & 1 == 1) {
            v += 1;
        }
        return sign | v as u16;
    }
    let mut v = ((e as u32) << 10) | (man >> 13);
    let rest = man & 0x1fff;
    if rest > 0x1000 || (rest == 0x1000 && v & 1 == 1) {
        v += 1;
    }
    sign | v as u16
}

pub fn f16_value(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0f32 } else { 1.0 };
    let exp = ((h >> 10) & 0x1f) as i32;
    let man = (h & 0x3ff) as f32;
    match exp {
        0 => sign * man * 2f32.powi(-24),
        0x1f => {
            if man == 0.0 { sign * f32::INFINITY } else { f32::NAN }
        }
        e => sign * (1.0 + man / 1024.0) * 2f32.powi(e - 15),
    }
}

/// The payload of one record's rows.
pub fn encode_rows(rows: &PlainRows, step: f64) -> Vec<u8> {
    let k = rows.k;
    let mut w = BitWriter::new();
    for r in 0..rows.rows() {
        w.put(half_bits(rows.tail[r]) as u64, 16);
        let mut entries: Vec<(i64, u64)> = (0..k)
            .map(|j| {
                let lp = rows.logprobs[r * k + j].min(0.0) as f64;
                (rows.ids[r * k + j], ((-lp / step).round() as u64).min(u16::MAX as u64))
            })
            .collect();
        entries.sort_unstable();
        let gaps: Vec<u64> =
            entries.iter().enumerate().map(|(i, e)| if i == 0 { e.0 as u64 } else { (e.0 - entries[i - 1].0 - 1) as u64 }).collect();
        let rg = best_rice(&gaps);
        w.put(rg as u64, 5);
        for &g in &gaps {
            w.rice(g, rg);
        }
        let qmax = entries.iter().map(|e| e.1).max().unwrap_or(0);
        let ws: Vec<u64> = entries.iter().map(|e| qmax - e.1).collect();
        let rw = best_rice(&ws);
        w.put(qmax, 16);
        w.put(rw as u64, 5);
        for &x in &ws {
            w.rice(x, rw);
        }
    }
    w.finish()
}

/// Decodes a payload of `n` rows of `k` entries.
pub fn decode_rows(payload: &[u8], n: usize, k: usize, step: f64) -> Result<PlainRows> {
    let mut rd = BitReader { bytes: payload, pos: 0 };
    let mut out = PlainRows { k, ids: Vec::with_capacity(n * k), logprobs: Vec::with_capacity(n * k), tail: Vec::with_capacity(n) };
    let mut entries: Vec<(u64, i64)> = Vec::with_capacity(k);
    for _ in 0..n {
        out.tail.push(f16_value(rd.get(16)? as u16));
        let rg = rd.get(5)? as u32;
        let mut id: i64 = -1;
        let mut ids = Vec::with_capacity(k);
        for _ in 0..k {
            id += rd.rice(rg)? as i64 + 1;
            ensure!(id < i32::MAX as i64, "a token id is out of range");
            ids.push(id);
        }
        let qmax = rd.get(16)?;
        let rw = rd.get(5)? as u32;
        entries.clear();
        for &id in &ids {
            let x = rd.rice(rw)?;
            ensure!(x <= qmax, "a log-probability is out of range");
            entries.push((qmax - x, id));
        }
        entries.sort_unstable();
        for &(q, id) in &entries {
            out.ids.push(id);
            out.logprobs.push((-(q as f64) * step) as f32);
        }
    }
    ensure!(rd.pos.div_ceil(8) == payload.len(), "{} bytes left after the last row", payload.len() - rd.pos.div_ceil(8));
    Ok(out)
}

/// One block of a compact file: where it is and which rows it holds.
#[derive(Clone, Copy, Debug)]
pub struct Block {
    pub offset: u64,
    pub first_row: u64,
    pub rows: u32,
}

/// A block as written: tag, rows, payload length, checksum, payload.
pub fn block_bytes(rows: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(17 + payload.len());
    b.push(b'B');
    b.extend_from_slice(&rows.to_le_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    b.extend_from_slice(&fnv64(payload).to_le_bytes());
    b.extend_from_slice(payload);
    b
}

/// Writes a compact file from whole blocks (each from [`block_bytes`], with its row count).
pub fn write_file(path: &Path, k: usize, step: f64, blocks: &[(u32, Vec<u8>)]) -> Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?);
    let header = json!({"format": "distillery-topk", "version": 1, "k": k, "step": step}).to_string();
    f.write_all(MAGIC)?;
    f.write_all(&(header.len() as u32).to_le_bytes())?;
    f.write_all(header.as_bytes())?;
    let mut offset = (12 + header.len()) as u64;
    let mut row = 0u64;
    let mut index = Vec::with_capacity(blocks.len() * INDEX_ENTRY + 1);
    index.push(b'I');
    for (rows, bytes) in blocks {
        f.write_all(bytes)?;
        index.extend_from_slice(&offset.to_le_bytes());
        index.extend_from_slice(&row.to_le_bytes());
        index.extend_from_slice(&rows.to_le_bytes());
        offset += bytes.len() as u64;
        row += *rows as u64;
    }
    f.write_all(&index)?;
    f.write_all(&offset.to_le_bytes())?;
    f.write_all(&(blocks.len() as u64).to_le_bytes())?;
    f.write_all(END)?;
    f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(())
}

/// Whether `path` starts like a compact file.
pub fn is_compact(path: &Path) -> Result<bool> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening teacher logits {}", path.display()))?;
    let mut m = [0u8; 8];
    Ok(f.read(&mut m)? == 8 && &m == MAGIC)
}

/// An open compact file: its header and index; blocks are read on demand.
pub struct CompactFile {
    path: PathBuf,
    file: std::fs::File,
    pub k: usize,
    pub step: f64,
    pub blocks: Vec<Block>,
}

fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().unwrap())
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().unwrap())
}

impl CompactFile {
    pub fn open(path: &Path) -> Result<CompactFile> {
        let p = path.display();
        let mut file = std::fs::File::open(path).with_context(|| format!("opening teacher logits {p}"))?;
        let len = file.metadata()?.len();
        let mut head = [0u8; 12];
        file.read_exact(&mut head).with_context(|| format!("{p}: too short for a compact top-K header"))?;
        ensure!(&head[..8] == MAGIC, "{p}: not a compact top-K file (bad magic)");
        let n = le_u32(&head[8..]) as u64;
        ensure!(12 + n <= len, "{p}: truncated inside its header");
        let mut text = vec![0u8; n as usize];
        file.read_exact(&mut text)?;
        let header: Value = serde_json::from_slice(&text).with_context(|| format!("{p}: malformed header"))?;
        ensure!(header["version"] == json!(1), "{p}: compact top-K version {} is not supported (this build reads 1)", header["version"]);
        let k = header["k"].as_u64().with_context(|| format!("{p}: header without `k`"))? as usize;
        let step = header["step"].as_f64().with_context(|| format!("{p}: header without `step`"))?;
        ensure!(k >= 1 && step > 0.0, "{p}: header has k = {k}, step = {step}");
        let first_block = 12 + n;
        let mut me = CompactFile { path: path.to_path_buf(), file, k, step, blocks: vec![] };
        match me.read_index(len, first_block) {
            Ok(blocks) => me.blocks = blocks,
            // No usable index: walk the blocks to name the first one that is cut off or corrupt.
            Err(e) => {
                let (whole, rows) = me.scan(first_block, len)?;
                bail!("{p}: truncated or corrupt ({e:#}); its {whole} whole record blocks hold rows 0..{rows}, the record block after them is not whole");
            }
        }
        Ok(me)
    }

    fn read_index(&mut self, len: u64, first_block: u64) -> Result<Vec<Block>> {
        ensure!(len >= first_block + FOOTER + 1, "no footer");
        let mut foot = [0u8; 24];
        self.file.seek(SeekFrom::Start(len - FOOTER))?;
        self.file.read_exact(&mut foot)?;
        ensure!(&foot[16..] == END, "no end marker");
        let (at, n) = (le_u64(&foot), le_u64(&foot[8..]));
        ensure!(at >= first_block && n.checked_mul(INDEX_ENTRY as u64).and_then(|b| b.checked_add(at + 1 + FOOTER)) == Some(len), "the index does not fit the file");
        let mut idx = vec![0u8; 1 + n as usize * INDEX_ENTRY];
        self.file.seek(SeekFrom::Start(at))?;
        self.file.read_exact(&mut idx)?;
        ensure!(idx[0] == b'I', "no index marker");
        let mut blocks = Vec::with_capacity(n as usize);
        let mut row = 0;
        for e in idx[1..].chunks(INDEX_ENTRY) {
            let b = Block { offset: le_u64(e), first_row: le_u64(&e[8..]), rows: le_u32(&e[16..]) };
            ensure!(b.first_row == row && b.offset >= first_block && b.offset < at, "index entry {} is inconsistent", blocks.len());
            row += b.rows as u64;
            blocks.push(b);
        }
        Ok(blocks)
    }

    /// Walks the blocks from the start: how many are whole and the rows they hold.
    fn scan(&mut self, mut at: u64, len: u64) -> Result<(usize, u64)> {
        let (mut n, mut rows) = (0, 0);
        loop {
            let Ok(raw) = self.raw_block(at, len) else { return Ok((n, rows)) };
            let r = le_u32(&raw[1..]) as u64;
            if self.check_payload(&raw).is_err() {
                return Ok((n, rows));
            }
            n += 1;
            rows += r;
            at += raw.len() as u64;
        }
    }

    fn raw_block(&mut self, at: u64, len: u64) -> Result<Vec<u8>> {
        ensure!(at + 17 <= len, "cut off");
        let mut head = [0u8; 17];
        self.file.seek(SeekFrom::Start(at))?;
        self.file.read_exact(&mut head)?;
        ensure!(head[0] == b'B', "no block marker");
        let size = le_u32(&head[5..]) as u64;
        ensure!(at + 17 + size <= len, "cut off");
        let mut raw = head.to_vec();
        raw.resize(17 + size as usize, 0);
        self.file.read_exact(&mut raw[17..])?;
        Ok(raw)
    }

    fn check_payload(&self, raw: &[u8]) -> Result<()> {
        ensure!(fnv64(&raw[17..]) == le_u64(&raw[9..]), "checksum mismatch");
        Ok(())
    }

    /// Block `b`'s bytes as written (tag to payload), checked.
    pub fn block(&mut self, b: usize) -> Result<Vec<u8>> {
        let blk = self.blocks[b];
        let end = self.blocks.get(b + 1).map(|n| n.offset).unwrap_or(u64::MAX);
        let len = self.file.metadata()?.len();
        let what = format!("{}: record block {b} (rows {}..{})", self.path.display(), blk.first_row, blk.first_row + blk.rows as u64);
        let raw = self.raw_block(blk.offset, len.min(end)).with_context(|| what.clone())?;
        ensure!(le_u32(&raw[1..]) == blk.rows, "{what}: its row count disagrees with the index");
        self.check_payload(&raw).with_context(|| what.clone())?;
        Ok(raw)
    }

    /// The block that starts at `row` and holds `n` rows.
    pub fn find(&self, row: u64, n: u64) -> Result<usize> {
        let b = self.blocks.partition_point(|b| b.first_row < row);
        // Blocks of zero rows share their start with the next one: take the one that fits.
        let hit = self.blocks[b..].iter().take_while(|x| x.first_row == row).position(|x| x.rows as u64 == n);
        hit.map(|h| b + h).with_context(|| {
            format!("teacher_logits rows {row}..{} are not a record block of {} ({} blocks)", row + n, self.path.display(), self.blocks.len())
        })
    }

    /// The decoded rows of block `b`.
    pub fn rows(&mut self, b: usize) -> Result<PlainRows> {
        let raw = self.block(b)?;
        let blk = self.blocks[b];
        decode_rows(&raw[17..], blk.rows as usize, self.k, self.step)
            .with_context(|| format!("{}: record block {b} (rows {}..{}) is corrupt", self.path.display(), blk.first_row, blk.first_row + blk.rows as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(rows: usize, k: usize, seed: u64) -> PlainRows {
        let mut rng = crate::base::rng::SplitMix64::new(seed);
        let mut out = PlainRows { k, ids: vec![], logprobs: vec![], tail: vec![] };
        for _ in 0..rows {
            let mut ids: Vec<i64> = vec![];
            while ids.len() < k {
                let id = (rng.next_f64() * 50000.0) as i64;
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
            let mut lps: Vec<f32> = (0..k).map(|_| (-(rng.next_f64() * 20.0)) as f32).collect();
            lps.sort_by(|a, b| b.total_cmp(a));
            out.ids.extend(ids);
            out.logprobs.extend(lps.iter().map(|&x| f16_value(half_bits(x))));
            out.tail.push(f16_value(half_bits(-(rng.next_f64() * 9.0) as f32)));
        }
        out
    }

    #[test]
    fn rows_round_trip_within_half_a_step() {
        for &(n, k) in &[(0, 4), (1, 1), (7, 16), (5, 64)] {
            let rows = sample(n, k, n as u64 + 11);
            let back = decode_rows(&encode_rows(&rows, DEFAULT_STEP), n, k, DEFAULT_STEP).unwrap();
            assert_eq!(back.tail, rows.tail);
            for r in 0..n {
                let mut want: Vec<(i64, f32)> = (0..k).map(|j| (rows.ids[r * k + j], rows.logprobs[r * k + j])).collect();
                let mut got: Vec<(i64, f32)> = (0..k).map(|j| (back.ids[r * k + j], back.logprobs[r * k + j])).collect();
                // Most likely first.
                assert!(got.windows(2).all(|w| w[0].1 >= w[1].1));
                want.sort_by_key(|e| e.0);
                got.sort_by_key(|e| e.0);
                for (a, b) in want.iter().zip(&got) {
                    assert_eq!(a.0, b.0);
                    assert!((a.1 - b.1).abs() as f64 <= DEFAULT_STEP / 2.0 + 1e-6, "{a:?} {b:?}");
                }
            }
        }
    }

    #[test]
    fn f16_bits_match_exact_values() {
        for h in [0u16, 0x3c00, 0xbc00, 0x0001, 0x03ff, 0x7bff, 0xd140, 0xc8b3] {
            assert_eq!(half_bits(f16_value(h)), h);
        }
    }

    #[test]
    fn a_corrupt_or_cut_payload_is_an_error() {
        let rows = sample(3, 8, 5);
        let p = encode_rows(&rows, DEFAULT_STEP);
        assert!(decode_rows(&p[..p.len() - 2], 3, 8, DEFAULT_STEP).is_err());
        assert!(decode_rows(&p, 4, 8, DEFAULT_STEP).is_err());
    }
}
