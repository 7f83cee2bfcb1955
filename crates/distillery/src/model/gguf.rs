//! GGUF files (llama.cpp, ollama, LM Studio): reading with every size checked before it is
//! trusted, dequantisation of the common tensor types, and the metadata a Hugging Face
//! checkpoint needs (config, tokenizer, chat template).
//!
//! Layout (little endian): magic `GGUF`, version (2 or 3), tensor count, metadata count, the
//! metadata key/value pairs, the tensor infos (name, dims innermost first, type, offset), then
//! the tensor data from the next multiple of `general.alignment` (32 by default).
use anyhow::{bail, ensure, Context, Result};
use half::{bf16, f16};
use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Meta {
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Meta>),
}

impl Meta {
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Meta::U64(v) => Some(*v),
            Meta::I64(v) if *v >= 0 => Some(*v as u64),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Meta::U64(v) => i64::try_from(*v).ok(),
            Meta::I64(v) => Some(*v),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Meta::F64(v) => Some(*v),
            Meta::U64(v) => Some(*v as f64),
            Meta::I64(v) => Some(*v as f64),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Meta::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Meta::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Meta]> {
        match self {
            Meta::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// The tensor types this crate reads (ggml's numbering).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    BF16,
}

impl GgmlType {
    pub fn from_id(id: u32) -> Option<GgmlType> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            10 => GgmlType::Q2K,
            11 => GgmlType::Q3K,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q2K => 10,
            GgmlType::Q3K => 11,
            GgmlType::Q4K => 12,
            GgmlType::Q5K => 13,
            GgmlType::Q6K => 14,
            GgmlType::BF16 => 30,
        }
    }

    /// (values per block, bytes per block)
    pub fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q5_0 => (32, 22),
            GgmlType::Q5_1 => (32, 24),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q2K => (256, 84),
            GgmlType::Q3K => (256, 110),
            GgmlType::Q4K => (256, 144),
            GgmlType::Q5K => (256, 176),
            GgmlType::Q6K => (256, 210),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q2K => "Q2_K",
            GgmlType::Q3K => "Q3_K",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q5K => "Q5_K",
            GgmlType::Q6K => "Q6_K",
            GgmlType::BF16 => "BF16",
        }
    }

    /// Bytes holding `n` values (`n` a multiple of the block size).
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        let (per, bytes) = self.block();
        (n % per == 0).then(|| n / per * bytes)
    }
}

/// ggml's names for the type ids this crate does not read, for messages.
fn unsupported_type_name(id: u32) -> String {
    const NAMES: &[(u32, &str)] = &[
        (9, "Q8_1"), (15, "Q8_K"), (16, "IQ2_XXS"), (17, "IQ2_XS"), (18, "IQ3_XXS"), (19, "IQ1_S"), (20, "IQ4_NL"),
        (21, "IQ3_S"), (22, "IQ2_S"), (23, "IQ4_XS"), (24, "I8"), (25, "I16"), (26, "I32"), (27, "I64"), (28, "F64"),
        (29, "IQ1_M"), (34, "TQ1_0"), (35, "TQ2_0"), (39, "MXFP4"),
    ];
    NAMES.iter().find(|(i, _)| *i == id).map_or(format!("type id {id}"), |(_, n)| n.to_string())
}

pub struct TensorInfo {
    pub name: String,
    /// ggml order: innermost (contiguous) dimension first.
    pub dims: Vec<u64>,
    pub kind: GgmlType,
    /// Absolute position of the data in the file.
    pub offset: u64,
    pub bytes: usize,
}

impl TensorInfo {
    /// The PyTorch shape: ggml's dimensions reversed.
    pub fn shape(&self) -> Vec<i64> {
        self.dims.iter().rev().map(|&d| d as i64).collect()
    }

    pub fn numel(&self) -> usize {
        self.dims.iter().product::<u64>() as usize
    }
}

pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub meta: HashMap<String, Meta>,
    pub tensors: Vec<TensorInfo>,
}

/// A reader that knows how many bytes the file has left, so no declared length can make it
/// allocate more than the file could hold.
struct Cursor<R> {
    r: R,
    pos: u64,
    len: u64,
}

impl<R: Read> Cursor<R> {
    fn bytes(&mut self, n: u64, what: &str) -> Result<Vec<u8>> {
        ensure!(n <= self.len.saturating_sub(self.pos), "truncated: {what} needs {n} bytes at offset {}, the file has {}", self.pos, self.len);
        let mut buf = vec![0u8; n as usize];
        self.r.read_exact(&mut buf).with_context(|| format!("reading {what}"))?;
        self.pos += n;
        Ok(buf)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes(4, what)?.try_into().unwrap()))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes(8, what)?.try_into().unwrap()))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.u64(what)?;
        String::from_utf8(self.bytes(n, what)?).with_context(|| format!("{what} is not valid UTF-8"))
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<Meta> {
        Ok(match ty {
            0 => Meta::U64(self.bytes(1, key)?[0] as u64),
            1 => Meta::I64(self.bytes(1, key)?[0] as i8 as i64),
            2 => Meta::U64(u16::from_le_bytes(self.bytes(2, key)?.try_into().unwrap()) as u64),
            3 => Meta::I64(i16::from_le_bytes(self.bytes(2, key)?.try_into().unwrap()) as i64),
            4 => Meta::U64(self.u32(key)? as u64),
            5 => Meta::I64(self.u32(key)? as i32 as i64),
            6 => Meta::F64(f32::from_le_bytes(self.bytes(4, key)?.try_into().unwrap()) as f64),
            7 => Meta::Bool(self.bytes(1, key)?[0] != 0),
            8 => Meta::Str(self.string(key)?),
            9 => {
                ensure!(depth < 4, "metadata `{key}`: arrays nested too deeply");
                let elem = self.u32(key)?;
                let n = self.u64(key)?;
                // Every element takes at least one byte: a count beyond the bytes left is a lie.
                ensure!(n <= self.len.saturating_sub(self.pos), "metadata `{key}`: array of {n} elements cannot fit in the file");
                let mut out = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    out.push(self.value(elem, key, depth + 1)?);
                }
                Meta::Array(out)
            }
            10 => Meta::U64(self.u64(key)?),
            11 => Meta::I64(self.u64(key)? as i64),
            12 => Meta::F64(f64::from_le_bytes(self.bytes(8, key)?.try_into().unwrap())),
            other => bail!("metadata `{key}`: unknown value type {other}"),
        })
    }
}

impl GgufFile {
    /// Reads the header, metadata and tensor infos; tensor data is read on demand.
    pub fn open(path: &Path) -> Result<GgufFile> {
        Self::read_header(path).with_context(|| format!("{}: not a readable GGUF file", path.display()))
    }

    fn read_header(path: &Path) -> Result<GgufFile> {
        let file = std::fs::File::open(path).context("opening")?;
        let len = file.metadata()?.len();
        let mut c = Cursor { r: std::io::BufReader::new(file), pos: 0, len };
        let magic = c.bytes(4, "the magic number")?;
        ensure!(magic == b"GGUF", "wrong magic number {:?} (expected \"GGUF\")", String::from_utf8_lossy(&magic));
        let version = c.u32("the version")?;
        ensure!(version == 2 || version == 3, "GGUF version {version} is not supported (2 or 3)");
        let n_tensors = c.u64("the tensor count")?;
        let n_meta = c.u64("the metadata count")?;
        // Each entry takes well over 8 bytes, so counts beyond len / 8 cannot be true.
        ensure!(n_tensors <= len / 8 && n_meta <= len / 8, "declares {n_tensors} tensors and {n_meta} metadata entries, more than the file can hold");
        let mut meta = HashMap::new();
        for _ in 0..n_meta {
            let key = c.string("a metadata key")?;
            let ty = c.u32(&key)?;
            let v = c.value(ty, &key, 0)?;
            meta.insert(key, v);
        }
        let mut infos = vec![];
        for _ in 0..n_tensors {
            let name = c.string("a tensor name")?;
            let n_dims = c.u32(&name)?;
            ensure!((1..=4).contains(&n_dims), "tensor `{name}` has {n_dims} dimensions");
            let dims = (0..n_dims).map(|_| c.u64(&name)).collect::<Result<Vec<_>>>()?;
            let type_id = c.u32(&name)?;
            let kind = GgmlType::from_id(type_id).with_context(|| {
                format!("tensor `{name}` has type {}, which this build cannot read (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)", unsupported_type_name(type_id))
            })?;
            let offset = c.u64(&name)?;
            let numel = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).filter(|&n| n <= len * 8).with_context(|| format!("tensor `{name}`: dimensions {dims:?} cannot fit in the file"))?;
            let bytes = kind.bytes_for(numel as usize).with_context(|| format!("tensor `{name}`: {numel} values are not whole {} blocks", kind.name()))?;
            infos.push((name, dims, kind, offset, bytes));
        }
        let alignment = meta.get("general.alignment").and_then(Meta::as_u64).unwrap_or(32);
        ensure!(alignment > 0 && alignment.is_power_of_two() && alignment <= 1 << 20, "general.alignment {alignment} is not a power of two");
        let data_start = c.pos.div_ceil(alignment) * alignment;
        let mut tensors = vec![];
        for (name, dims, kind, offset, bytes) in infos {
            let start = data_start.checked_add(offset).context("tensor offset overflows")?;
            ensure!(
                start.checked_add(bytes as u64).is_some_and(|end| end <= len),
                "truncated: tensor `{name}` ({} bytes at {start}) runs past the end of the file ({len} bytes)",
                bytes
            );
            tensors.push(TensorInfo { name, dims, kind, offset: start, bytes });
        }
        Ok(GgufFile { path: path.to_path_buf(), version, meta, tensors })
    }

    pub fn get(&self, key: &str) -> Option<&Meta> {
        self.meta.get(key)
    }

    pub fn architecture(&self) -> Result<&str> {
        self.get("general.architecture").and_then(Meta::as_str).context("no `general.architecture` in the metadata")
    }

    /// `{arch}.{key}`, the per-architecture metadata.
    pub fn arch_key(&self, key: &str) -> Option<&Meta> {
        let arch = self.get("general.architecture").and_then(Meta::as_str)?;
        self.get(&format!("{arch}.{key}"))
    }

    /// One tensor's raw bytes.
    pub fn raw(&self, t: &TensorInfo) -> Result<Vec<u8>> {
        let mut f = std::fs::File::open(&self.path)?;
        f.seek(SeekFrom::Start(t.offset))?;
        let mut buf = vec![0u8; t.bytes];
        f.read_exact(&mut buf).with_context(|| format!("{}: reading tensor `{}`", self.path.display(), t.name))?;
        Ok(buf)
    }

    /// One tensor dequantised to f32, in the PyTorch shape's row-major order.
    pub fn dequantize(&self, t: &TensorInfo) -> Result<Vec<f32>> {
        Ok(dequantize(t.kind, &self.raw(t)?, t.numel()))
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantises `n` values of type `kind` from `data` (which holds exactly their blocks).
/// Each block layout follows ggml's reference (`ggml-quants.c`; gguf-py's `quants.py`).
pub fn dequantize(kind: GgmlType, data: &[u8], n: usize) -> Vec<f32> {
    let (per, size) = kind.block();
    let mut out = vec![0f32; n];
    for (blk, o) in data.chunks_exact(size).zip(out.chunks_exact_mut(per)) {
        match kind {
            GgmlType::F32 => o[0] = f32::from_le_bytes([blk[0], blk[1], blk[2], blk[3]]),
            GgmlType::F16 => o[0] = f16_at(blk, 0),
            GgmlType::BF16 => o[0] = bf16::from_le_bytes([blk[0], blk[1]]).to_f32(),
            GgmlType::Q4_0 => {
                let d = f16_at(blk, 0);
                for j in 0..16 {
                    let q = blk[2 + j];
                    o[j] = ((q & 0xF) as i32 - 8) as f32 * d;
                    o[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
                }
            }
            GgmlType::Q4_1 => {
                let (d, m) = (f16_at(blk, 0), f16_at(blk, 2));
                for j in 0..16 {
                    let q = blk[4 + j];
                    o[j] = (q & 0xF) as f32 * d + m;
                    o[j + 16] = (q >> 4) as f32 * d + m;
                }
            }
            GgmlType::Q5_0 | GgmlType::Q5_1 => {
                let (d, m, h, qs) = if kind == GgmlType::Q5_0 { (f16_at(blk, 0), 0.0, 2, 6) } else { (f16_at(blk, 0), f16_at(blk, 2), 4, 8) };
                let qh = u32::from_le_bytes([blk[h], blk[h + 1], blk[h + 2], blk[h + 3]]);
                let offset = if kind == GgmlType::Q5_0 { 16 } else { 0 };
                for j in 0..16 {
                    let q = blk[qs + j];
                    let lo = (q & 0xF) as u32 | ((qh >> j) & 1) << 4;
                    let hi = (q >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4;
                    o[j] = (lo as i32 - offset) as f32 * d + m;
                    o[j + 16] = (hi as i32 - offset) as f32 * d + m;
                }
            }
            GgmlType::Q8_0 => {
                let d = f16_at(blk, 0);
                for j in 0..32 {
                    o[j] = blk[2 + j] as i8 as f32 * d;
                }
            }
            GgmlType::Q2K => {
                let (scales, qs) = (&blk[0..16], &blk[16..80]);
                let (d, dmin) = (f16_at(blk, 80), f16_at(blk, 82));
                for v in 0..256 {
                    let (g, s, l) = (v / 128, (v % 128) / 32, v % 32);
                    let q = (qs[g * 32 + l] >> (2 * s)) & 3;
                    let sc = scales[v / 16];
                    o[v] = d * (sc & 0xF) as f32 * q as f32 - dmin * (sc >> 4) as f32;
                }
            }
            GgmlType::Q3K => {
                let (hmask, qs, sc, d) = (&blk[0..32], &blk[32..96], &blk[96..108], f16_at(blk, 108));
                let scale = |i: usize| -> f32 {
                    let low = (sc[i % 8] >> (4 * (i / 8))) & 0xF;
                    let high = (sc[8 + i % 4] >> (2 * (i / 4))) & 3;
                    ((low | high << 4) as i32 - 32) as f32
                };
                for v in 0..256 {
                    let (g, s, l) = (v / 128, (v % 128) / 32, v % 32);
                    let ql = ((qs[g * 32 + l] >> (2 * s)) & 3) as i32;
                    // A set mask bit means no offset (ggml's convention).
                    let qh = (((hmask[l] >> (v / 32)) & 1) ^ 1) as i32;
                    o[v] = d * scale(v / 16) * (ql - (qh << 2)) as f32;
                }
            }
            GgmlType::Q4K | GgmlType::Q5K => {
                let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
                let (sc, mn) = k_scale_min(&blk[4..16]);
                let (qh, qs) = if kind == GgmlType::Q4K { (None, &blk[16..144]) } else { (Some(&blk[16..48]), &blk[48..176]) };
                for v in 0..256 {
                    let (j, l) = (v / 32, v % 32);
                    let mut q = (qs[(j / 2) * 32 + l] >> (4 * (j % 2))) & 0xF;
                    if let Some(qh) = qh {
                        q |= ((qh[l] >> j) & 1) << 4;
                    }
                    o[v] = d * sc[j] as f32 * q as f32 - dmin * mn[j] as f32;
                }
            }
            GgmlType::Q6K => {
                let (ql, qh, scales, d) = (&blk[0..128], &blk[128..192], &blk[192..208], f16_at(blk, 208));
                for v in 0..256 {
                    let (g, r) = (v / 128, v % 128);
                    let lo = (ql[g * 64 + r % 64] >> (4 * (r / 64))) & 0xF;
                    let hi = (qh[g * 32 + r % 32] >> (2 * (r / 32))) & 3;
                    let q = (lo | hi << 4) as i32 - 32;
                    o[v] = d * scales[v / 16] as i8 as f32 * q as f32;
                }
            }
        }
    }
    out
}

/// The 6-bit scales and mins of Q4_K/Q5_K's 8 sub-blocks, packed into 12 bytes.
fn k_scale_min(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut mn) = ([0u8; 8], [0u8; 8]);
    for j in 0..4 {
        sc[j] = s[j] & 0x3F;
        mn[j] = s[4 + j] & 0x3F;
        sc[4 + j] = (s[8 + j] & 0x0F) | ((s[j] >> 2) & 0x30);
        mn[4 + j] = (s[8 + j] >> 4) | ((s[4 + j] >> 2) & 0x30);
    }
    (sc, mn)
}

/// Quantises f32 values (a multiple of 32) to Q8_0 as ggml's reference does: per block of
/// 32, scale = max|x| / 127 stored as f16, values rounded half away from zero.
pub fn quantize_q8_0(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / 32 * 34);
    for blk in x.chunks(32) {
        let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend(blk.iter().map(|v| (v * id).round() as i8 as u8));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_round_trips_within_half_a_step() {
        let x: Vec<f32> = (0..64).map(|i| ((i as f32) * 0.37).sin() * 3.0).collect();
        let back = dequantize(GgmlType::Q8_0, &quantize_q8_0(&x), 64);
        for (a, b) in x.iter().zip(&back) {
            assert!((a - b).abs() <= 3.0 / 127.0 * 0.51 + 1e-3, "{a} vs {b}");
        }
    }

    #[test]
    fn q4_0_block_decodes_low_then_high_nibbles() {
        let mut blk = f16::from_f32(0.5).to_le_bytes().to_vec();
        blk.extend((0..16u8).map(|j| j | (15 - j) << 4));
        let v = dequantize(GgmlType::Q4_0, &blk, 32);
        assert_eq!(v[0], -4.0); // (0 - 8) * 0.5
        assert_eq!(v[15], 3.5); // (15 - 8) * 0.5
        assert_eq!(v[16], 3.5); // high nibble of byte 0 is 15
        assert_eq!(v[31], -4.0);
    }

    #[test]
    fn k_scales_unpack_six_bits() {
        let s = [1, 2, 3, 4, 5, 6, 7, 8, 0x9A, 0xBC, 0xDE, 0xF0];
        let (sc, mn) = k_scale_min(&s);
        assert_eq!(sc, [1, 2, 3, 4, 0xA, 0xC, 0xE, 0x0]);
        assert_eq!(mn, [5, 6, 7, 8, 0x9, 0xB, 0xD, 0xF]);
    }
}
