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
use crate::model::checkpoint::{read_safetensors, write_safetensors};
use crate::base::io::write_via_temp;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// The sidecar file written beside a JSONL output.
pub fn sidecar_path(jsonl: &Path) -> PathBuf {
    let name = jsonl.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    jsonl.with_file_name(format!("{name}.logits.safetensors"))
}

/// The summary's figures for a written sidecar: its format, size and bytes per stored token
/// (the whole file, header included, over its rows).
pub fn sidecar_stats(path: &Path, rows: i64, k: i64) -> Result<Value> {
    let bytes = std::fs::metadata(path).with_context(|| format!("reading the size of {}", path.display()))?.len();
    Ok(json!({
        "file": path.file_name().map(|n| n.to_string_lossy().into_owned()),
        "format": "safetensors",
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

/// Builds a sidecar from rows pushed in record order, then writes it atomically.
pub struct LogitsWriter {
    k: i64,
    parts: Vec<TopRows>,
    rows: i64,
}

impl LogitsWriter {
    pub fn new(k: i64) -> LogitsWriter {
        LogitsWriter { k, parts: vec![], rows: 0 }
    }

    /// Adds a record's rows; returns its pointer JSON (without the file name, which callers add).
    pub fn push_rows(&mut self, rows: TopRows) -> Value {
        let n = rows.rows();
        let pointer = json!({"row": self.rows, "rows": n, "k": self.k});
        self.rows += n;
        self.parts.push(rows);
        pointer
    }

    pub fn rows(&self) -> i64 {
        self.rows
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let all = TopRows::cat(&self.parts, self.k);
        write_via_temp(path, |tmp| all.write_to(tmp))
    }
}

/// Reads sidecars on demand (one per file name) and serves rows as fp32/int64 tensors.
pub struct LogitsReader {
    dir: PathBuf,
    /// When set, every pointer reads this file whatever its `file` says.
    only: Option<PathBuf>,
    files: HashMap<String, (Tensor, Tensor, Tensor)>,
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
        if !self.files.contains_key(file) {
            let path = self.dir.join(file);
            let tensors: HashMap<String, Tensor> = read_safetensors(&path)
                .with_context(|| format!("reading teacher logits {}", path.display()))?
                .into_iter()
                .collect();
            let get = |k: &str| {
                tensors.get(k).map(|t| t.shallow_clone()).with_context(|| format!("{}: no `{k}` tensor", path.display()))
            };
            let (idx, lp, tail) = (get("indices")?, get("logprobs")?, get("tail_logmass")?);
            check_shapes(&path, &idx, &lp, &tail)?;
            self.files.insert(file.to_string(), (idx, lp, tail));
        }
        let (idx, lp, tail) = &self.files[file];
        if row < 0 || n < 0 || row.checked_add(n).map_or(true, |end| end > idx.size()[0]) {
            bail!("teacher_logits rows {row}..{} are outside {file} ({} rows)", row.saturating_add(n), idx.size()[0]);
        }
        Ok((
            idx.narrow(0, row, n).to_kind(Kind::Int64),
            lp.narrow(0, row, n).to_kind(Kind::Float),
            tail.narrow(0, row, n).to_kind(Kind::Float),
        ))
    }
}
