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
use crate::model::checkpoint::write_safetensors;
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

pub fn bytes_per_row(k: i64) -> i64 {
    k * 4 + k * 2 + 2
}

/// Accumulates rows, then writes the sidecar atomically.
pub struct LogitsWriter {
    k: i64,
    indices: Vec<Tensor>,
    logprobs: Vec<Tensor>,
    tails: Vec<Tensor>,
    rows: i64,
}

impl LogitsWriter {
    pub fn new(k: i64) -> LogitsWriter {
        LogitsWriter { k, indices: vec![], logprobs: vec![], tails: vec![], rows: 0 }
    }

    /// Adds the top-K of `logits` `[n, vocab]`; returns the record's pointer JSON (without
    /// the file name, added by [`LogitsWriter::finish`] callers).
    pub fn push(&mut self, logits: &Tensor) -> Value {
        self.push_logprobs(&logits.to_kind(Kind::Float).log_softmax(-1, Kind::Float))
    }

    /// As [`LogitsWriter::push`], for fp32 log-probabilities `[n, vocab]`.
    pub fn push_logprobs(&mut self, lp: &Tensor) -> Value {
        let (top, idx) = lp.topk(self.k, -1, true, true);
        let tail = top.logsumexp(-1, false).exp().neg().g_add_scalar(1.0).clamp_min(1e-30).log();
        let n = top.size()[0];
        self.indices.push(idx.to_kind(Kind::Int).to_device(Device::Cpu));
        self.logprobs.push(top.to_kind(Kind::Half).to_device(Device::Cpu));
        self.tails.push(tail.to_kind(Kind::Half).to_device(Device::Cpu));
        let pointer = json!({"row": self.rows, "rows": n, "k": self.k});
        self.rows += n;
        pointer
    }

    pub fn rows(&self) -> i64 {
        self.rows
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let cat = |v: &[Tensor], kind: Kind, shape: &[i64]| {
            if v.is_empty() {
                Tensor::zeros(shape, (kind, Device::Cpu))
            } else {
                Tensor::cat(v, 0)
            }
        };
        let tensors = vec![
            ("indices".to_string(), cat(&self.indices, Kind::Int, &[0, self.k])),
            ("logprobs".to_string(), cat(&self.logprobs, Kind::Half, &[0, self.k])),
            ("tail_logmass".to_string(), cat(&self.tails, Kind::Half, &[0])),
        ];
        write_via_temp(path, |tmp| write_safetensors(&tensors, tmp))
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
            let tensors: HashMap<String, Tensor> = Tensor::read_safetensors(&path)
                .with_context(|| format!("reading teacher logits {}", path.display()))?
                .into_iter()
                .collect();
            let get = |k: &str| {
                tensors.get(k).map(|t| t.shallow_clone()).with_context(|| format!("{}: no `{k}` tensor", path.display()))
            };
            self.files.insert(file.to_string(), (get("indices")?, get("logprobs")?, get("tail_logmass")?));
        }
        let (idx, lp, tail) = &self.files[file];
        if row < 0 || row + n > idx.size()[0] {
            bail!("teacher_logits rows {row}..{} are outside {file} ({} rows)", row + n, idx.size()[0]);
        }
        Ok((
            idx.narrow(0, row, n).to_kind(Kind::Int64),
            lp.narrow(0, row, n).to_kind(Kind::Float),
            tail.narrow(0, row, n).to_kind(Kind::Float),
        ))
    }
}
