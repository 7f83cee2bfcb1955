//! Offline teacher logits: the teacher's top-K log-probabilities at each completion
//! position, stored once so that distillation can run without loading the teacher.
//!
//! # Format (documented in docs/FORMATS.md)
//! A safetensors sidecar next to the JSONL (`<out>.logits.safetensors`) holding, over all
//! stored rows concatenated:
//! * `indices`: `[rows, K]` int32 token ids, most likely first;
//! * `logprobs`: `[rows, K]` float16 log-probabilities at temperature 1;
//! * `tail_logmass`: `[rows]` float16 log of the probability outside the top K.
//!
//! Each JSONL record points at its rows: `"teacher_logits": {"file": "<sidecar file name>",
//! "row": first_row, "rows": n, "k": K}`. Row `i` is the distribution that predicts
//! `completion_ids[i]` (or, for scored corpus text, token `i + 1`). At K = 32 a row takes
//! 32 * 4 + 32 * 2 + 2 = 194 bytes.
//!
//! `--logits-format compact` writes `<out>.logits.topk` instead ([`crate::data::topk_compact`]:
//! Rice-coded sorted ids and log-probabilities quantised to 1/16 nat, one checksummed block per
//! record, an index for random access). Readers tell the two apart by the file's first bytes.
use crate::model::checkpoint::{read_safetensors, write_safetensors};
use crate::base::io::write_via_temp;
use crate::data::topk_compact::{self, is_compact, CompactFile, PlainRows};
use anyhow::{bail, ensure, Context, Result};
use rayon::prelude::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// The sidecar file written beside a JSONL output (the safetensors format's name).
pub fn sidecar_path(jsonl: &Path) -> PathBuf {
    sidecar_path_for(jsonl, LogitsFormat::Safetensors)
}

/// The sidecar file of `format` beside a JSONL output.
pub fn sidecar_path_for(jsonl: &Path, format: LogitsFormat) -> PathBuf {
    let name = jsonl.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    jsonl.with_file_name(format!("{name}.logits.{}", format.suffix()))
}

/// How a sidecar stores its rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsFormat {
    /// `indices` int32, `logprobs` float16, `tail_logmass` float16 tensors: 6K + 2 bytes a row.
    Safetensors,
    /// [`crate::data::topk_compact`]: about 14 bits per entry on a 4k vocabulary.
    Compact,
}

impl std::str::FromStr for LogitsFormat {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<LogitsFormat> {
        match s {
            "safetensors" => Ok(LogitsFormat::Safetensors),
            "compact" => Ok(LogitsFormat::Compact),
            o => bail!("logits format `{o}`: must be safetensors or compact"),
        }
    }
}

impl LogitsFormat {
    pub fn name(self) -> &'static str {
        match self {
            LogitsFormat::Safetensors => "safetensors",
            LogitsFormat::Compact => "compact",
        }
    }

    pub fn suffix(self) -> &'static str {
        match self {
            LogitsFormat::Safetensors => "safetensors",
            LogitsFormat::Compact => "topk",
        }
    }

    /// The format of an existing sidecar, from its first bytes.
    pub fn of_file(path: &Path) -> Result<LogitsFormat> {
        Ok(if is_compact(path)? { LogitsFormat::Compact } else { LogitsFormat::Safetensors })
    }
}

/// Bytes of one row in the safetensors sidecar (its header aside).
pub fn bytes_per_row(k: i64) -> i64 {
    k * 4 + k * 2 + 2
}

/// How kd-generate reports a sidecar's size: the file's bytes per stored token, and for the
/// safetensors format its fixed row size.
pub fn size_line(format: LogitsFormat, k: i64, per_token: f64) -> String {
    match format {
        LogitsFormat::Safetensors => format!("{} bytes per token ({per_token:.1} bytes per stored token, header included)", bytes_per_row(k)),
        LogitsFormat::Compact => format!("{per_token:.1} bytes per stored token (compact)"),
    }
}

/// The summary's figures for a written sidecar: its format, size and bytes per stored token
/// (the whole file, header included, over its rows).
pub fn sidecar_stats(path: &Path, rows: i64, k: i64) -> Result<Value> {
    let bytes = std::fs::metadata(path).with_context(|| format!("reading the size of {}", path.display()))?.len();
    Ok(json!({
        "file": path.file_name().map(|n| n.to_string_lossy().into_owned()),
        "format": LogitsFormat::of_file(path)?.name(),
        "k": k,
        "rows": rows,
        "bytes": bytes,
        "bytes_per_token": (rows > 0).then(|| bytes as f64 / rows as f64),
    }))
}

/// Top-K rows as stored: `indices` `[n, K]` int32, `logprobs` `[n, K]` f16, `tail_logmass`
/// `[n]` f16, on the CPU.
pub struct TopRows {
    pub indices: Tensor,
    pub logprobs: Tensor,
    pub tail_logmass: Tensor,
}

impl TopRows {
    /// The stored form of fp32 log-probabilities `[n, vocab]`.
    pub fn from_logprobs(lp: &Tensor, k: i64) -> TopRows {
        let (top, idx) = lp.topk(k, -1, true, true);
        let tail = top.logsumexp(-1, false).exp().neg().g_add_scalar(1.0).clamp_min(1e-30).log();
        TopRows {
            indices: idx.to_kind(Kind::Int).to_device(Device::Cpu),
            logprobs: top.to_kind(Kind::Half).to_device(Device::Cpu),
            tail_logmass: tail.to_kind(Kind::Half).to_device(Device::Cpu),
        }
    }

    pub fn empty(k: i64) -> TopRows {
        TopRows {
            indices: Tensor::zeros([0, k], (Kind::Int, Device::Cpu)),
            logprobs: Tensor::zeros([0, k], (Kind::Half, Device::Cpu)),
            tail_logmass: Tensor::zeros([0], (Kind::Half, Device::Cpu)),
        }
    }

    pub fn rows(&self) -> i64 {
        self.indices.size()[0]
    }

    pub fn shallow_clone(&self) -> TopRows {
        TopRows { indices: self.indices.shallow_clone(), logprobs: self.logprobs.shallow_clone(), tail_logmass: self.tail_logmass.shallow_clone() }
    }

    /// Rows concatenated in order (`k` for an empty list).
    pub fn cat(parts: &[TopRows], k: i64) -> TopRows {
        if parts.is_empty() {
            return TopRows::empty(k);
        }
        let pick = |f: fn(&TopRows) -> &Tensor| Tensor::cat(&parts.iter().map(f).collect::<Vec<_>>(), 0);
        TopRows { indices: pick(|r| &r.indices), logprobs: pick(|r| &r.logprobs), tail_logmass: pick(|r| &r.tail_logmass) }
    }

    /// The rows as plain vectors (ids, float16 log-probabilities as f32, tail as f32).
    pub fn to_plain(&self) -> PlainRows {
        let k = self.indices.size().get(1).copied().unwrap_or(0) as usize;
        let flat = |t: &Tensor, kind: Kind| t.reshape([-1]).to_kind(kind);
        PlainRows {
            k,
            ids: Vec::<i64>::try_from(flat(&self.indices, Kind::Int64)).unwrap_or_default(),
            logprobs: Vec::<f32>::try_from(flat(&self.logprobs, Kind::Float)).unwrap_or_default(),
            tail: Vec::<f32>::try_from(flat(&self.tail_logmass, Kind::Float)).unwrap_or_default(),
        }
    }

    /// Stored rows from plain vectors (the stored dtypes: int32 ids, float16 values).
    pub fn from_plain(p: &PlainRows) -> TopRows {
        let (n, k) = (p.rows() as i64, p.k as i64);
        TopRows {
            indices: Tensor::from_slice(&p.ids).reshape([n, k]).to_kind(Kind::Int),
            logprobs: Tensor::from_slice(&p.logprobs).reshape([n, k]).to_kind(Kind::Half),
            tail_logmass: Tensor::from_slice(&p.tail).to_kind(Kind::Half),
        }
    }

    pub fn narrow(&self, start: i64, n: i64) -> TopRows {
        TopRows { indices: self.indices.narrow(0, start, n), logprobs: self.logprobs.narrow(0, start, n), tail_logmass: self.tail_logmass.narrow(0, start, n) }
    }

    /// Writes the rows as a sidecar file at `path` (not atomic: callers write to a temporary path).
    pub fn write_to(&self, path: &Path) -> Result<()> {
        let tensors = vec![
            ("indices".to_string(), self.indices.shallow_clone()),
            ("logprobs".to_string(), self.logprobs.shallow_clone()),
            ("tail_logmass".to_string(), self.tail_logmass.shallow_clone()),
        ];
        write_safetensors(&tensors, path)
    }

    /// Reads a sidecar file written by [`TopRows::write_to`], checking its tensors agree.
    pub fn read(path: &Path) -> Result<TopRows> {
        let tensors: HashMap<String, Tensor> =
            read_safetensors(path).with_context(|| format!("reading teacher logits {}", path.display()))?.into_iter().collect();
        let get = |k: &str| tensors.get(k).map(|t| t.shallow_clone()).with_context(|| format!("{}: no `{k}` tensor", path.display()));
        let rows = TopRows { indices: get("indices")?, logprobs: get("logprobs")?, tail_logmass: get("tail_logmass")? };
        check_shapes(path, &rows.indices, &rows.logprobs, &rows.tail_logmass)?;
        Ok(rows)
    }
}

/// The three tensors of a sidecar must agree: `[n, K]`, `[n, K]`, `[n]`.
fn check_shapes(path: &Path, idx: &Tensor, lp: &Tensor, tail: &Tensor) -> Result<()> {
    let (a, b, c) = (idx.size(), lp.size(), tail.size());
    if a.len() != 2 || a != b || c.len() != 1 || c[0] != a[0] {
        bail!("{}: tensor shapes disagree (indices {a:?}, logprobs {b:?}, tail_logmass {c:?}; expected [n, K], [n, K], [n])", path.display());
    }
    Ok(())
}

/// One record's rows in a [`LogitsWriter`]: decoded, or a compact block copied as it is.
enum Part {
    Rows(TopRows),
    Block(u32, Vec<u8>),
}

/// Builds a sidecar from rows pushed in record order, then writes it atomically.
pub struct LogitsWriter {
    k: i64,
    format: LogitsFormat,
    parts: Vec<Part>,
    rows: i64,
}

impl LogitsWriter {
    pub fn new(k: i64) -> LogitsWriter {
        LogitsWriter::with_format(k, LogitsFormat::Safetensors)
    }

    pub fn with_format(k: i64, format: LogitsFormat) -> LogitsWriter {
        LogitsWriter { k, format, parts: vec![], rows: 0 }
    }

    fn pointer(&mut self, n: i64) -> Value {
        let pointer = json!({"row": self.rows, "rows": n, "k": self.k});
        self.rows += n;
        pointer
    }

    /// Adds a record's rows; returns its pointer JSON (without the file name, which callers add).
    pub fn push_rows(&mut self, rows: TopRows) -> Value {
        let pointer = self.pointer(rows.rows());
        self.parts.push(Part::Rows(rows));
        pointer
    }

    /// Adds a compact file's block as it is (kd-merge): `raw` from [`CompactFile::block`].
    pub fn push_block(&mut self, rows: u32, raw: Vec<u8>) -> Result<Value> {
        ensure!(self.format == LogitsFormat::Compact, "a compact block goes into a compact sidecar only");
        let pointer = self.pointer(rows as i64);
        self.parts.push(Part::Block(rows, raw));
        Ok(pointer)
    }

    pub fn rows(&self) -> i64 {
        self.rows
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        match self.format {
            LogitsFormat::Safetensors => {
                let rows: Vec<TopRows> = self
                    .parts
                    .iter()
                    .map(|p| match p {
                        Part::Rows(r) => Ok(r.shallow_clone()),
                        Part::Block(..) => bail!("a compact block cannot go into a safetensors sidecar"),
                    })
                    .collect::<Result<_>>()?;
                let all = TopRows::cat(&rows, self.k);
                write_via_temp(path, |tmp| all.write_to(tmp))
            }
            LogitsFormat::Compact => {
                let coding = topk_compact::Coding::current(self.k as usize, topk_compact::DEFAULT_STEP);
                // Tensors to plain rows here (tensors stay on this thread), then the records
                // are encoded in parallel: each block is independent of the others.
                let plain: Vec<Result<PlainRows, (u32, &Vec<u8>)>> = self
                    .parts
                    .iter()
                    .map(|p| match p {
                        Part::Rows(r) => Ok(r.to_plain()),
                        Part::Block(n, raw) => Err((*n, raw)),
                    })
                    .collect();
                let blocks: Vec<(u32, Vec<u8>)> = plain
                    .par_iter()
                    .map(|p| match p {
                        Ok(rows) => {
                            let n = rows.rows() as u32;
                            (n, topk_compact::block_bytes(n, &topk_compact::encode_rows(rows, &coding)))
                        }
                        Err((n, raw)) => (*n, raw.to_vec()),
                    })
                    .collect();
                write_via_temp(path, |tmp| topk_compact::write_file(tmp, &coding, &blocks))
            }
        }
    }
}

/// One open sidecar of a [`LogitsReader`].
enum Loaded {
    Dense(Tensor, Tensor, Tensor),
    Compact(CompactFile),
}

/// Reads sidecars on demand (one per file name, either format) and serves rows as
/// fp32/int64 tensors. A compact sidecar is read block by block, never whole.
pub struct LogitsReader {
    dir: PathBuf,
    /// When set, every pointer reads this file whatever its `file` says.
    only: Option<PathBuf>,
    files: HashMap<String, Loaded>,
}

impl LogitsReader {
    /// Resolves each pointer's `file` relative to the JSONL's directory.
    pub fn new(jsonl_dir: &Path) -> LogitsReader {
        LogitsReader { dir: jsonl_dir.to_path_buf(), only: None, files: HashMap::new() }
    }

    /// Reads every pointer's rows from one given sidecar.
    pub fn with_file(path: &Path) -> LogitsReader {
        LogitsReader { dir: PathBuf::new(), only: Some(path.to_path_buf()), files: HashMap::new() }
    }

    /// The stored rows a record points at: `(indices [n,k] i64, logprobs [n,k] f32, tail [n] f32)`.
    pub fn rows(&mut self, pointer: &Value) -> Result<(Tensor, Tensor, Tensor)> {
        let only = self.only.as_ref().map(|p| p.to_string_lossy().into_owned());
        let file = match &only {
            Some(f) => f.as_str(),
            None => pointer.get("file").and_then(Value::as_str).context("`teacher_logits.file` missing")?,
        };
        let row = pointer.get("row").and_then(Value::as_i64).context("`teacher_logits.row` missing")?;
        let n = pointer.get("rows").and_then(Value::as_i64).context("`teacher_logits.rows` missing")?;
        ensure!(row >= 0 && n >= 0, "teacher_logits rows {row}..{} are negative", row.saturating_add(n));
        if !self.files.contains_key(file) {
            let path = self.dir.join(file);
            let loaded = if is_compact(&path)? {
                Loaded::Compact(CompactFile::open(&path)?)
            } else {
                let tensors: HashMap<String, Tensor> = read_safetensors(&path)
                    .with_context(|| format!("reading teacher logits {} (a safetensors sidecar is read whole: cut off or corrupt, it serves no record; the compact format names the first bad record)", path.display()))?
                    .into_iter()
                    .collect();
                let get = |k: &str| {
                    tensors.get(k).map(|t| t.shallow_clone()).with_context(|| format!("{}: no `{k}` tensor", path.display()))
                };
                let (idx, lp, tail) = (get("indices")?, get("logprobs")?, get("tail_logmass")?);
                check_shapes(&path, &idx, &lp, &tail)?;
                Loaded::Dense(idx, lp, tail)
            };
            self.files.insert(file.to_string(), loaded);
        }
        match self.files.get_mut(file).expect("inserted above") {
            Loaded::Dense(idx, lp, tail) => {
                if row.checked_add(n).map_or(true, |end| end > idx.size()[0]) {
                    bail!("teacher_logits rows {row}..{} are outside {file} ({} rows)", row.saturating_add(n), idx.size()[0]);
                }
                Ok((
                    idx.narrow(0, row, n).to_kind(Kind::Int64),
                    lp.narrow(0, row, n).to_kind(Kind::Float),
                    tail.narrow(0, row, n).to_kind(Kind::Float),
                ))
            }
            Loaded::Compact(c) => {
                let k = c.coding.k as i64;
                let p = if n == 0 { PlainRows { k: c.coding.k, ids: vec![], logprobs: vec![], tail: vec![] } } else { c.rows(c.find(row as u64, n as u64)?)? };
                Ok((
                    Tensor::from_slice(&p.ids).reshape([n, k]),
                    Tensor::from_slice(&p.logprobs).reshape([n, k]),
                    Tensor::from_slice(&p.tail),
                ))
            }
        }
    }
}
