//! The compact top-K sidecar (`kd-generate --store-logits K --logits-format compact`,
//! `<out>.logits.topk`): at K = 64, about 111 bytes per token on SmolLM2's 49k vocabulary and
//! fewer on the demo's 4k, against 386 for the safetensors sidecar (docs/BENCHMARKS.md).
//! Layout (docs/FORMATS.md; `scripts/read_topk.py` reads it):
//!
//! ```text
//! header  "DSTLTOPK" | u32 n | n bytes of JSON {"format", "version", "k", "step", "recent_ids"}
//! blocks  one per record: b'B' | u32 rows | u32 payload bytes | u64 FNV-1a of payload | payload
//! index   b'I' | per block: u64 offset of its b'B' | u64 first row | u32 rows
//! footer  u64 offset of the index | u64 blocks | "DSTLEND1"
//! ```
//! (integers little-endian). A block's payload is a bit stream (least significant bit first)
//! of its rows; [`encode_rows`] describes a row. Token ids are coded against a list of the
//! record's recently stored ids ([`RecentIds`]): most of a row's top-K tokens appeared in the
//! record's earlier rows (47 of 64 on SmolLM2), so a list position is far cheaper than an id (on
//! SmolLM2 this took K = 64 from 140 to 111 bytes a token; version 1, still read, coded every id
//! as a gap between sorted ids). Log-probabilities are quantised to `Q = round(-logprob /
//! step)`. A Rice code of `x` with parameter `r` is `x >> r` ones, a zero and the low `r` bits
//! of `x`; a quotient of 32 or more is written as 32 ones and `x` in 32 bits. Decoding puts a
//! row's entries most likely first (ties by id); a log-probability comes back within
//! `step / 2` of the stored float16 value, the tail log-mass exactly. Blocks are independent:
//! kd-merge copies them, and a reader seeks to any record through the index (or streams the
//! blocks in order).
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

/// The newest format version, the one written.
pub const VERSION: u64 = 2;

/// How many of a record's recent ids version 2 keeps to code the next rows against: 16 K
/// measured best on SmolLM2 (4 K to unbounded all within 5%).
pub fn recent_ids_cap(k: usize) -> usize {
    16 * k
}

/// Version 2's per-record list of recent ids, most recently seen first: after each row, the
/// row's ids already in the list move to the front (in their list order), its new ids follow
/// (ascending), and the list keeps its first `cap` entries. Frequent tokens (",", " the")
/// stay near the front, so their positions cost a bit or two instead of a sparse id's ~11.
struct RecentIds {
    list: Vec<i64>,
    cap: usize,
}

impl RecentIds {
    fn new(cap: usize) -> RecentIds {
        RecentIds { list: Vec::new(), cap }
    }

    /// `hits`: ascending positions in the list; `new`: ascending ids not in it.
    fn update(&mut self, hits: &[usize], new: &[i64]) {
        let mut next = Vec::with_capacity((self.list.len() + new.len()).min(self.cap));
        next.extend(hits.iter().map(|&p| self.list[p]));
        next.extend_from_slice(new);
        let mut h = hits.iter().peekable();
        for (j, &t) in self.list.iter().enumerate() {
            if h.peek() == Some(&&j) {
                h.next();
            } else if next.len() < self.cap {
                next.push(t);
            } else {
                break;
            }
        }
        next.truncate(self.cap);
        self.list = next;
    }
}

fn gaps(sorted: &[u64]) -> Vec<u64> {
    sorted.iter().enumerate().map(|(i, &x)| if i == 0 { x } else { x - sorted[i - 1] - 1 }).collect()
}

fn put_rice_run(w: &mut BitWriter, xs: &[u64]) {
    if xs.is_empty() {
        return;
    }
    let r = best_rice(xs);
    w.put(r as u64, 5);
    for &x in xs {
        w.rice(x, r);
    }
}

fn get_rice_run(rd: &mut BitReader, n: usize) -> Result<Vec<u64>> {
    if n == 0 {
        return Ok(vec![]);
    }
    let r = rd.get(5)? as u32;
    (0..n).map(|_| rd.rice(r)).collect()
}

/// Rice parameter of a row's count of new ids.
const NEW_COUNT_RICE: u32 = 3;

/// The quantised `-logprob / step` of each entry, capped to 16 bits.
fn quantise(lp: f32, step: f64) -> u64 {
    ((-(lp.min(0.0) as f64) / step).round() as u64).min(u16::MAX as u64)
}

/// The payload of one record's rows (format version 2). Per row: the tail log-mass as float16
/// bits; the count of ids not in the recent list (Rice, parameter 3); the ascending list
/// positions of the other ids as Rice-coded gaps (5-bit parameter, only when there are any);
/// the new ids ascending as Rice-coded gaps (likewise); `Qmax` (16 bits), a 5-bit parameter and
/// the Rice-coded `Qmax - Q` of each id in that order (listed ones, then new ones).
pub fn encode_rows(rows: &PlainRows, c: &Coding) -> Vec<u8> {
    let (k, step) = (rows.k, c.step);
    debug_assert!(c.version == VERSION && c.k == k);
    let mut w = BitWriter::new();
    let mut recent = RecentIds::new(c.recent);
    let mut entries: Vec<(i64, u64)> = Vec::with_capacity(k);
    let mut listed = vec![false; k];
    let mut in_row: Vec<u64> = Vec::new();
    for r in 0..rows.rows() {
        w.put(half_bits(rows.tail[r]) as u64, 16);
        entries.clear();
        entries.extend((0..k).map(|j| (rows.ids[r * k + j], quantise(rows.logprobs[r * k + j], step))));
        entries.sort_unstable();
        listed.iter_mut().for_each(|x| *x = false);
        // The row's ids as bits, so that the scan of the list is a bit test per entry.
        for e in &entries {
            let i = e.0 as usize;
            if i / 64 >= in_row.len() {
                in_row.resize(i / 64 + 1, 0);
            }
            in_row[i / 64] |= 1 << (i % 64);
        }
        let mut hits = Vec::with_capacity(k);
        let mut order = Vec::with_capacity(k);
        for (pos, &id) in recent.list.iter().enumerate() {
            let i = id as usize;
            if in_row[i / 64] & (1 << (i % 64)) != 0 {
                let e = entries.binary_search_by_key(&id, |e| e.0).expect("a marked id is in the row");
                hits.push(pos);
                order.push(e);
                listed[e] = true;
            }
        }
        for e in &entries {
            in_row[e.0 as usize / 64] = 0;
        }
        let new: Vec<i64> = entries.iter().zip(&listed).filter(|(_, &l)| !l).map(|(e, _)| e.0).collect();
        order.extend((0..k).filter(|&e| !listed[e]));
        w.rice(new.len() as u64, NEW_COUNT_RICE);
        put_rice_run(&mut w, &gaps(&hits.iter().map(|&p| p as u64).collect::<Vec<_>>()));
        put_rice_run(&mut w, &gaps(&new.iter().map(|&id| id as u64).collect::<Vec<_>>()));
        let qmax = entries.iter().map(|e| e.1).max().unwrap_or(0);
        w.put(qmax, 16);
        put_rice_run(&mut w, &order.iter().map(|&e| qmax - entries[e].1).collect::<Vec<_>>());
        recent.update(&hits, &new);
    }
    w.finish()
}

/// How a file's payloads are coded: its header.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Coding {
    pub k: usize,
    pub step: f64,
    pub version: u64,
    /// Version 2's recent-id list length.
    pub recent: usize,
}

impl Coding {
    /// What this build writes.
    pub fn current(k: usize, step: f64) -> Coding {
        Coding { k, step, version: VERSION, recent: recent_ids_cap(k) }
    }
}

/// Decodes a payload of `n` rows written with `c` (version 1 or 2).
pub fn decode_rows(payload: &[u8], n: usize, c: &Coding) -> Result<PlainRows> {
    let (k, step, version) = (c.k, c.step, c.version);
    let mut rd = BitReader { bytes: payload, pos: 0 };
    let mut out = PlainRows { k, ids: Vec::with_capacity(n * k), logprobs: Vec::with_capacity(n * k), tail: Vec::with_capacity(n) };
    let mut entries: Vec<(u64, i64)> = Vec::with_capacity(k);
    let mut recent = RecentIds::new(c.recent);
    for _ in 0..n {
        out.tail.push(f16_value(rd.get(16)? as u16));
        let ids = match version {
            1 => {
                let rg = rd.get(5)? as u32;
                let mut id: i64 = -1;
                let mut ids = Vec::with_capacity(k);
                for _ in 0..k {
                    id += rd.rice(rg)? as i64 + 1;
                    ensure!(id < i32::MAX as i64, "a token id is out of range");
                    ids.push(id);
                }
                ids
            }
            _ => {
                let n_new = rd.rice(NEW_COUNT_RICE)? as usize;
                ensure!(n_new <= k, "a row has {n_new} new ids, more than k = {k}");
                let mut hits = Vec::with_capacity(k - n_new);
                let mut pos: i64 = -1;
                for g in get_rice_run(&mut rd, k - n_new)? {
                    pos += g as i64 + 1;
                    ensure!((pos as usize) < recent.list.len(), "a list position is out of range");
                    hits.push(pos as usize);
                }
                let mut new = Vec::with_capacity(n_new);
                let mut id: i64 = -1;
                for g in get_rice_run(&mut rd, n_new)? {
                    id += g as i64 + 1;
                    ensure!(id < i32::MAX as i64, "a token id is out of range");
                    new.push(id);
                }
                let mut ids: Vec<i64> = hits.iter().map(|&p| recent.list[p]).collect();
                ids.extend_from_slice(&new);
                recent.update(&hits, &new);
                ids
            }
        };
        let qmax = rd.get(16)?;
        let ws = if version == 1 {
            let rw = rd.get(5)? as u32;
            (0..k).map(|_| rd.rice(rw)).collect::<Result<Vec<_>>>()?
        } else {
            get_rice_run(&mut rd, k)?
        };
        entries.clear();
        for (&id, &x) in ids.iter().zip(&ws) {
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
pub fn write_file(path: &Path, c: &Coding, blocks: &[(u32, Vec<u8>)]) -> Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?);
    ensure!(c.version == VERSION, "this build writes compact top-K version {VERSION} only");
    let header = json!({"format": "distillery-topk", "version": c.version, "k": c.k, "step": c.step, "recent_ids": c.recent}).to_string();
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
    pub coding: Coding,
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
        let version = header["version"].as_u64().filter(|v| (1..=VERSION).contains(v));
        let version = version.with_context(|| format!("{p}: compact top-K version {} is not supported (this build reads 1 to {VERSION})", header["version"]))?;
        let k = header["k"].as_u64().with_context(|| format!("{p}: header without `k`"))? as usize;
        let step = header["step"].as_f64().with_context(|| format!("{p}: header without `step`"))?;
        ensure!(k >= 1 && step > 0.0, "{p}: header has k = {k}, step = {step}");
        let recent = match version {
            1 => 0,
            _ => header["recent_ids"].as_u64().with_context(|| format!("{p}: version {version} header without `recent_ids`"))? as usize,
        };
        let first_block = 12 + n;
        let coding = Coding { k, step, version, recent };
        let mut me = CompactFile { path: path.to_path_buf(), file, coding, blocks: vec![] };
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
        decode_rows(&raw[17..], blk.rows as usize, &self.coding)
            .with_context(|| format!("{}: record block {b} (rows {}..{}) is corrupt", self.path.display(), blk.first_row, blk.first_row + blk.rows as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(rows: usize, k: usize, seed: u64) -> PlainRows {
        sample_rows(rows, k, seed, 0.0)
    }

    /// Random rows; with `common_share` > 0 that share of ids comes from a small common set,
    /// so that rows repeat ids as a language model's top-K do.
    fn sample_rows(rows: usize, k: usize, seed: u64, common_share: f64) -> PlainRows {
        let mut rng = crate::base::rng::SplitMix64::new(seed);
        let common: Vec<i64> = (0..3 * k as i64).map(|i| i * 7 + 3).collect();
        let mut out = PlainRows { k, ids: vec![], logprobs: vec![], tail: vec![] };
        for _ in 0..rows {
            let mut ids: Vec<i64> = vec![];
            while ids.len() < k {
                let from_common = common_share > 0.0 && rng.next_f64() < common_share;
                let id = if from_common { common[(rng.next_f64() * common.len() as f64) as usize] } else { (rng.next_f64() * 50000.0) as i64 };
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

    /// Version 1's encoder (sorted ids as Rice-coded gaps), kept to test the reader of old files.
    fn encode_rows_v1(rows: &PlainRows, step: f64) -> Vec<u8> {
        let k = rows.k;
        let mut w = BitWriter::new();
        for r in 0..rows.rows() {
            w.put(half_bits(rows.tail[r]) as u64, 16);
            let mut entries: Vec<(i64, u64)> = (0..k).map(|j| (rows.ids[r * k + j], quantise(rows.logprobs[r * k + j], step))).collect();
            entries.sort_unstable();
            let ids: Vec<u64> = entries.iter().map(|e| e.0 as u64).collect();
            let gs = gaps(&ids);
            let rg = best_rice(&gs);
            w.put(rg as u64, 5);
            gs.iter().for_each(|&g| w.rice(g, rg));
            let qmax = entries.iter().map(|e| e.1).max().unwrap_or(0);
            let ws: Vec<u64> = entries.iter().map(|e| qmax - e.1).collect();
            let rw = best_rice(&ws);
            w.put(qmax, 16);
            w.put(rw as u64, 5);
            ws.iter().for_each(|&x| w.rice(x, rw));
        }
        w.finish()
    }

    /// Rows whose ids repeat from row to row, as a language model's top-K do.
    fn sample_overlapping(rows: usize, k: usize, seed: u64) -> PlainRows {
        sample_rows(rows, k, seed, 0.7)
    }

    fn assert_same_rows(rows: &PlainRows, back: &PlainRows, step: f64) {
        let k = rows.k;
        assert_eq!(back.tail, rows.tail);
        for r in 0..rows.rows() {
            let mut want: Vec<(i64, f32)> = (0..k).map(|j| (rows.ids[r * k + j], rows.logprobs[r * k + j])).collect();
            let mut got: Vec<(i64, f32)> = (0..k).map(|j| (back.ids[r * k + j], back.logprobs[r * k + j])).collect();
            // Most likely first.
            assert!(got.windows(2).all(|w| w[0].1 >= w[1].1));
            want.sort_by_key(|e| e.0);
            got.sort_by_key(|e| e.0);
            for (a, b) in want.iter().zip(&got) {
                assert_eq!(a.0, b.0);
                assert!((a.1 - b.1).abs() as f64 <= step / 2.0 + 1e-6, "{a:?} {b:?}");
            }
        }
    }

    #[test]
    fn rows_round_trip_within_half_a_step() {
        for &(n, k) in &[(0, 4), (1, 1), (7, 16), (5, 64), (300, 8)] {
            for rows in [sample(n, k, n as u64 + 11), sample_overlapping(n, k, n as u64 + 12)] {
                let c = Coding::current(k, DEFAULT_STEP);
                assert_same_rows(&rows, &decode_rows(&encode_rows(&rows, &c), n, &c).unwrap(), DEFAULT_STEP);
            }
        }
    }

    #[test]
    fn version_1_payloads_still_read() {
        let rows = sample_overlapping(40, 16, 3);
        let c = Coding { k: 16, step: DEFAULT_STEP, version: 1, recent: 0 };
        let v1 = decode_rows(&encode_rows_v1(&rows, DEFAULT_STEP), 40, &c).unwrap();
        assert_same_rows(&rows, &v1, DEFAULT_STEP);
        let c2 = Coding::current(16, DEFAULT_STEP);
        // Same values either way; repeated ids make version 2 smaller.
        assert_eq!(decode_rows(&encode_rows(&rows, &c2), 40, &c2).unwrap(), v1);
        assert!(encode_rows(&rows, &c2).len() < encode_rows_v1(&rows, DEFAULT_STEP).len());
    }

    #[test]
    fn the_recent_list_moves_hits_to_the_front_and_keeps_its_cap() {
        let mut r = RecentIds::new(5);
        r.update(&[], &[4, 9]);
        assert_eq!(r.list, [4, 9]);
        r.update(&[1], &[1, 2, 3]);
        assert_eq!(r.list, [9, 1, 2, 3, 4]);
        r.update(&[2, 4], &[7]);
        assert_eq!(r.list, [2, 4, 7, 9, 1]);
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
        let c = Coding::current(8, DEFAULT_STEP);
        let p = encode_rows(&rows, &c);
        assert!(decode_rows(&p[..p.len() - 2], 3, &c).is_err());
        assert!(decode_rows(&p, 4, &c).is_err());
    }
}
