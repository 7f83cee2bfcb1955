//! The teacher seam: what the stages ask of a teacher, whatever it is.
//!
//! Generation (kd-generate, kd-augment), scoring (kd-filter), stored logits (kd-generate
//! `--store-logits`), evaluation (kd-eval's teacher KL and agreement) and offline
//! distillation talk to a [`Teacher`]. [`LocalTeacher`] is a model in this process;
//! [`StoredTeacher`] serves the top-k log-probabilities a run stored earlier;
//! [`served::ServedTeacher`] is a model behind an inference server (vLLM, SGLang, llama.cpp).
pub mod engine;
pub mod echo;
pub mod served;

use crate::base::batch::{chunk_rows, pad_right, row_chunks};
use crate::data::teacher_logits::{LogitsReader, TopRows};
use crate::model::decode::{generate_until, Sampling};
use crate::model::tokenizer::{SpecialTokens, Tok};
use crate::model::{CausalLm, ModelFiles};
use crate::base::rng::SplitMix64;
use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use std::cell::RefCell;
use tch::{Kind, Tensor};

/// One sequence to be scored: `ids[from..]` are the targets, each predicted from its prefix.
/// `record` is the caller's record index (a stored teacher finds its rows by it).
#[derive(Clone, Copy, Debug)]
pub struct Query<'a> {
    pub record: usize,
    pub ids: &'a [i64],
    pub from: usize,
}

impl Query<'_> {
    pub fn targets(&self) -> i64 {
        self.ids.len().saturating_sub(self.from.max(1)) as i64
    }
}

/// Stored top-k log-probabilities for a set of rows, with the mass outside them.
pub struct SparseTeacher {
    /// `[n, k]` int64 token ids.
    pub indices: Tensor,
    /// `[n, k]` fp32 log-probabilities (temperature 1).
    pub logprobs: Tensor,
    /// `[n]` fp32 log of the probability mass outside the top-k.
    pub tail_logmass: Tensor,
}

impl SparseTeacher {
    pub fn to_device(&self, device: tch::Device) -> SparseTeacher {
        SparseTeacher { indices: self.indices.to_device(device), logprobs: self.logprobs.to_device(device), tail_logmass: self.tail_logmass.to_device(device) }
    }

    pub fn narrow(&self, start: i64, len: i64) -> SparseTeacher {
        SparseTeacher {
            indices: self.indices.narrow(0, start, len),
            logprobs: self.logprobs.narrow(0, start, len),
            tail_logmass: self.tail_logmass.narrow(0, start, len),
        }
    }

    fn rows(&self) -> i64 {
        self.indices.size()[0]
    }

    /// The rows at `index` `[m]`.
    pub fn select(&self, index: &Tensor) -> SparseTeacher {
        SparseTeacher {
            indices: self.indices.index_select(0, index),
            logprobs: self.logprobs.index_select(0, index),
            tail_logmass: self.tail_logmass.index_select(0, index),
        }
    }

    /// `[n, vocab]` log-probabilities: the top-k as stored, the tail mass spread evenly over
    /// the other `vocab - k` tokens (how offline KD re-tempers a stored row).
    pub fn densify(&self, vocab: i64) -> Tensor {
        let (n, k) = self.indices.size2().expect("[n, k] indices");
        let per_token = &self.tail_logmass - ((vocab - k).max(1) as f64).ln();
        per_token.unsqueeze(1).expand([n, vocab], false).contiguous().scatter(1, &self.indices, &self.logprobs)
    }
}

/// A teacher's next-token distributions (temperature 1) at consecutive target positions.
pub enum Predictions {
    /// Full log-probabilities `[n, vocab]` fp32.
    Dense(Tensor),
    /// Top-k only. Statistics then treat the mass outside the top-k as one bucket: the
    /// entropy and KL are those of the bucketed distributions (lower bounds of the full
    /// ones), and a target outside the top-k gets the tail's log-mass (an upper bound).
    TopK(SparseTeacher),
}

impl Predictions {
    pub fn rows(&self) -> i64 {
        match self {
            Predictions::Dense(lp) => lp.size()[0],
            Predictions::TopK(s) => s.rows(),
        }
    }

    /// `[n]` log-probability of each target `[n]`.
    pub fn target_logprobs(&self, targets: &Tensor) -> Tensor {
        let t = targets.unsqueeze(1);
        match self {
            Predictions::Dense(lp) => lp.gather(1, &t, false).squeeze_dim(1),
            Predictions::TopK(s) => {
                let hit = s.indices.eq_tensor(&t); // [n, k]
                let found = hit.any_dim(1, false);
                let lp = s.logprobs.masked_fill(&hit.logical_not(), f64::NEG_INFINITY).amax([1i64].as_slice(), false);
                lp.where_self(&found, &s.tail_logmass)
            }
        }
    }

    /// `[n]` probability of the most likely token.
    pub fn confidence(&self) -> Tensor {
        match self {
            Predictions::Dense(lp) => lp.exp().max_dim(-1, false).0,
            Predictions::TopK(s) => s.logprobs.narrow(1, 0, 1).squeeze_dim(1).exp(),
        }
    }

    /// `[n]` most likely token.
    pub fn argmax(&self) -> Tensor {
        match self {
            Predictions::Dense(lp) => lp.argmax(-1, false),
            Predictions::TopK(s) => s.indices.narrow(1, 0, 1).squeeze_dim(1),
        }
    }

    /// `[n]` entropy in nats.
    pub fn entropy(&self) -> Tensor {
        let h = |lp: &Tensor| (lp.exp() * lp).sum_dim_intlist(-1, false, Kind::Float).neg();
        match self {
            Predictions::Dense(lp) => h(lp),
            Predictions::TopK(s) => h(&s.bucketed()),
        }
    }

    /// `[n]` KL(teacher || model) for the model's log-probabilities `[n, vocab]`.
    pub fn kl_to(&self, model_lp: &Tensor) -> Tensor {
        match self {
            Predictions::Dense(lp) => (lp.exp() * (lp - model_lp)).sum_dim_intlist(-1, false, Kind::Float),
            Predictions::TopK(s) => {
                let lt = s.bucketed();
                let top = model_lp.gather(1, &s.indices, false);
                let tail = top.logsumexp(-1, true).exp().neg().g_add_scalar(1.0).clamp_min(1e-30).log();
                let lm = Tensor::cat(&[top, tail], 1);
                (lt.exp() * (&lt - lm)).sum_dim_intlist(-1, false, Kind::Float)
            }
        }
    }
}

impl SparseTeacher {
    /// `[n, k + 1]`: the top-k log-probabilities and the tail bucket.
    pub fn bucketed(&self) -> Tensor {
        Tensor::cat(&[self.logprobs.shallow_clone(), self.tail_logmass.unsqueeze(1)], 1)
    }
}

/// What every stage may ask of a teacher.
pub trait Teacher {
    /// The name runs and records cite (a directory, a hub id, a file).
    fn name(&self) -> &str;
    fn vocab_size(&self) -> i64;

    /// The server behind a served teacher (for what only a server offers, such as its own
    /// chat template).
    fn served(&self) -> Option<&served::ServedTeacher> {
        None
    }

    /// Completions of token prompts, up to and including the first EOS; `rngs[i]` is row i's
    /// sampling stream, and `stop(completion so far)` ends a row early (stop strings).
    fn generate(
        &self,
        prompts: &[Vec<i64>],
        sampling: &Sampling,
        rngs: &mut [SplitMix64],
        stop: &dyn Fn(&[i64]) -> bool,
    ) -> Result<Vec<Vec<i64>>>;

    /// Completions as [`Teacher::generate`] gives them and, with `k`, the top-`k` rows
    /// (temperature 1) predicting every completion token. A server returns both from one
    /// request; the default scores the completions afterwards with [`Teacher::predict`].
    fn generate_top(
        &self,
        prompts: &[Vec<i64>],
        sampling: &Sampling,
        rngs: &mut [SplitMix64],
        stop: &dyn Fn(&[i64]) -> bool,
        k: Option<i64>,
        batch: usize,
    ) -> Result<(Vec<Vec<i64>>, Option<Vec<TopRows>>)> {
        let outs = self.generate(prompts, sampling, rngs, stop)?;
        let rows = match k {
            Some(k) => Some(top_rows_of(self, prompts, &outs, k, batch)?),
            None => None,
        };
        Ok((outs, rows))
    }

    /// Teacher-forced predictions of every query's targets, handed to `sink(query index,
    /// first target row, predictions)` in order, a bounded chunk of rows at a time.
    /// `batch` sequences share a forward pass where the teacher runs one.
    fn predict(&self, queries: &[Query], batch: usize, sink: &mut dyn FnMut(usize, i64, Predictions) -> Result<()>) -> Result<()>;

    /// The model itself when it lives in this process (hidden states and attention maps for
    /// intermediate matching need it).
    fn local(&self) -> Option<&CausalLm> {
        None
    }
}

/// The stored top-`k` rows predicting each `completions[i]` after `prompts[i]`, from the
/// teacher's full distributions or from a top-K of at least `k`.
pub fn top_rows_of<T: Teacher + ?Sized>(teacher: &T, prompts: &[Vec<i64>], completions: &[Vec<i64>], k: i64, batch: usize) -> Result<Vec<TopRows>> {
    let seqs: Vec<Vec<i64>> = prompts.iter().zip(completions).map(|(p, c)| p.iter().chain(c).copied().collect()).collect();
    let queries: Vec<Query> = seqs.iter().zip(prompts).enumerate().map(|(j, (s, p))| Query { record: j, ids: s, from: p.len() }).collect();
    let mut chunks: Vec<Vec<TopRows>> = (0..prompts.len()).map(|_| vec![]).collect();
    teacher.predict(&queries, batch, &mut |q, _off, pred| {
        // A long completion comes in several chunks, in order.
        chunks[q].push(match pred {
            Predictions::Dense(lp) => TopRows::from_logprobs(&lp, k),
            Predictions::TopK(s) => {
                ensure!(s.indices.size()[1] >= k, "the teacher returned its top-{}, {k} were asked for", s.indices.size()[1]);
                let (top, pos) = s.logprobs.topk(k, -1, true, true);
                let idx = s.indices.gather(1, &pos, false);
                let tail = top.logsumexp(-1, false).exp().neg().g_add_scalar(1.0).clamp_min(1e-30).log();
                TopRows { indices: idx.to_kind(Kind::Int), logprobs: top.to_kind(Kind::Half), tail_logmass: tail.to_kind(Kind::Half) }
            }
        });
        Ok(())
    })?;
    let mut out = vec![];
    for (q, c) in chunks.iter().enumerate() {
        let rows = TopRows::cat(c, k);
        ensure!(rows.rows() == completions[q].len() as i64, "the teacher returned {} rows for a completion of {} tokens", rows.rows(), completions[q].len());
        out.push(rows);
    }
    Ok(out)
}

/// A model loaded in this process.
pub struct LocalTeacher {
    pub model: CausalLm,
    pub files: ModelFiles,
    pub tok: Tok,
    pub special: SpecialTokens,
    /// Logit rows per chunk (0: automatic, see [`chunk_rows`]).
    pub chunk: i64,
}

impl LocalTeacher {
    pub fn new(model: CausalLm, files: ModelFiles, tok: Tok) -> Result<LocalTeacher> {
        let special = SpecialTokens::resolve(&files, &model.config)?;
        Ok(LocalTeacher { model, files, tok, special, chunk: 0 })
    }
}

impl Teacher for LocalTeacher {
    fn name(&self) -> &str {
        &self.files.name
    }

    fn vocab_size(&self) -> i64 {
        self.model.config.vocab_size
    }

    fn generate(
        &self,
        prompts: &[Vec<i64>],
        sampling: &Sampling,
        rngs: &mut [SplitMix64],
        stop: &dyn Fn(&[i64]) -> bool,
    ) -> Result<Vec<Vec<i64>>> {
        generate_until(&self.model, prompts, sampling, rngs, stop)
    }

    fn predict(&self, queries: &[Query], batch: usize, sink: &mut dyn FnMut(usize, i64, Predictions) -> Result<()>) -> Result<()> {
        let model = &self.model;
        let chunk = chunk_rows(self.chunk, model.config.vocab_size, model.device());
        let seqs: Vec<&[i64]> = queries.iter().map(|q| q.ids).collect();
        tch::no_grad(|| {
            for start in (0..queries.len()).step_by(batch.max(1)) {
                let rows: Vec<usize> = (start..(start + batch.max(1)).min(queries.len())).collect();
                let b = pad_right(&seqs, &rows, 0, model.device());
                let h = model.forward_hidden(&b.input_ids, Some(&b.attention_mask), Default::default(), None)?.hidden;
                for (r, &i) in rows.iter().enumerate() {
                    let q = &queries[i];
                    let n = q.targets();
                    let from = q.from.max(1) as i64;
                    let hi = h.get(r as i64);
                    for (off, len) in row_chunks(n, chunk) {
                        let logits = model.logits(&hi.narrow(0, from - 1 + off, len));
                        sink(i, off, Predictions::Dense(logits.to_kind(Kind::Float).log_softmax(-1, Kind::Float)))?;
                    }
                }
            }
            Ok(())
        })
    }

    fn local(&self) -> Option<&CausalLm> {
        Some(&self.model)
    }
}

/// The top-k a run stored earlier (kd-generate `--store-logits`): one pointer per record,
/// whose rows predict the record's completion tokens.
pub struct StoredTeacher {
    name: String,
    vocab_size: i64,
    reader: RefCell<LogitsReader>,
    /// Per record index: the `teacher_logits` pointer and the prompt length its rows start after.
    pointers: Vec<Option<(Value, usize)>>,
}

impl StoredTeacher {
    pub fn new(name: String, vocab_size: i64, reader: LogitsReader, pointers: Vec<Option<(Value, usize)>>) -> StoredTeacher {
        StoredTeacher { name, vocab_size, reader: RefCell::new(reader), pointers }
    }

    /// The stored rows of one record, all of them.
    pub fn record_rows(&self, record: usize) -> Result<(SparseTeacher, usize)> {
        let (pointer, from) = self
            .pointers
            .get(record)
            .and_then(Option::as_ref)
            .with_context(|| format!("record {record} has no stored teacher logits (`teacher_logits`)"))?;
        let (indices, logprobs, tail_logmass) =
            self.reader.borrow_mut().rows(pointer).with_context(|| format!("record {record}'s stored teacher logits"))?;
        Ok((SparseTeacher { indices, logprobs, tail_logmass }, *from))
    }
}

impl Teacher for StoredTeacher {
    fn name(&self) -> &str {
        &self.name
    }

    fn vocab_size(&self) -> i64 {
        self.vocab_size
    }

    fn generate(&self, _: &[Vec<i64>], _: &Sampling, _: &mut [SplitMix64], _: &dyn Fn(&[i64]) -> bool) -> Result<Vec<Vec<i64>>> {
        bail!("stored teacher logits ({}) cannot generate; give a teacher model", self.name)
    }

    fn predict(&self, queries: &[Query], _batch: usize, sink: &mut dyn FnMut(usize, i64, Predictions) -> Result<()>) -> Result<()> {
        for (i, q) in queries.iter().enumerate() {
            let (rows, from) = self.record_rows(q.record)?;
            // Rows exist for the completion only: a query may start there or later.
            ensure!(
                q.from.max(1) >= from,
                "record {}: stored teacher logits start at token {from}, but targets from token {} were asked for",
                q.record,
                q.from.max(1)
            );
            let skip = (q.from.max(1) - from) as i64;
            let n = q.targets();
            ensure!(
                rows.rows() >= skip + n,
                "record {}: {} stored teacher rows, {} needed (was the sidecar written for these records?)",
                q.record,
                rows.rows(),
                skip + n
            );
            sink(i, 0, Predictions::TopK(rows.narrow(skip, n)))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn dense() -> Tensor {
        Tensor::from_slice(&[2.0f32, 1.0, 0.5, -1.0, 0.0, 3.0, -2.0, 1.0]).view([2, 4]).log_softmax(-1, Kind::Float)
    }

    /// Top-k with every token kept is the dense distribution.
    fn full_topk(lp: &Tensor) -> SparseTeacher {
        let (logprobs, indices) = lp.topk(4, -1, true, true);
        SparseTeacher { indices, logprobs, tail_logmass: Tensor::full([2], -1e30, (Kind::Float, Device::Cpu)) }
    }

    fn close(a: &Tensor, b: &Tensor) -> bool {
        (a - b).abs().max().double_value(&[]) < 1e-5
    }

    #[test]
    fn top_k_with_every_token_agrees_with_dense() {
        let lp = dense();
        let (d, s) = (Predictions::Dense(lp.shallow_clone()), Predictions::TopK(full_topk(&lp)));
        let targets = Tensor::from_slice(&[3i64, 1]);
        let model = Tensor::from_slice(&[0.1f32, 0.2, 0.3, 0.4, 0.4, 0.3, 0.2, 0.1]).view([2, 4]).log();
        assert!(close(&d.target_logprobs(&targets), &s.target_logprobs(&targets)));
        assert!(close(&d.confidence(), &s.confidence()));
        assert!(close(&d.entropy(), &s.entropy()));
        assert!(close(&d.kl_to(&model), &s.kl_to(&model)));
        assert!(d.argmax().equal(&s.argmax()));
    }

    #[test]
    fn a_target_outside_the_top_k_gets_the_tail_mass() {
        let lp = dense();
        let (top, idx) = lp.topk(2, -1, true, true);
        let tail = top.logsumexp(-1, false).exp().neg().g_add_scalar(1.0).log();
        let s = Predictions::TopK(SparseTeacher { indices: idx, logprobs: top, tail_logmass: tail.shallow_clone() });
        // Row 0's least likely token (id 3) is outside its top-2; row 1's best (id 1) is inside.
        let got = s.target_logprobs(&Tensor::from_slice(&[3i64, 1]));
        let got = Vec::<f32>::try_from(got).unwrap();
        assert!((got[0] - tail.double_value(&[0]) as f32).abs() < 1e-6);
        assert!((got[1] - lp.double_value(&[1, 1]) as f32).abs() < 1e-6);
        // Bucketed entropy never exceeds the full one.
        let (hd, hs) = (Predictions::Dense(lp).entropy(), s.entropy());
        assert!(Vec::<f32>::try_from(hs - hd).unwrap().iter().all(|x| *x <= 1e-6));
    }

    #[test]
    fn stored_teacher_serves_a_record_s_rows_from_its_prompt_on() {
        let lp = dense();
        let mut w = crate::data::teacher_logits::LogitsWriter::new(2);
        let mut p = w.push_rows(crate::data::teacher_logits::TopRows::from_logprobs(&lp, 2));
        let dir = std::env::temp_dir().join(format!("distillery-stored-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("t.logits.safetensors");
        w.write(&file).unwrap();
        p["file"] = serde_json::json!("t.logits.safetensors");
        let reader = LogitsReader::with_file(&file);
        let t = StoredTeacher::new("stored".into(), 4, reader, vec![None, Some((p, 3))]);
        let ids = [0i64, 1, 2, 3, 1];
        let mut rows = vec![];
        t.predict(&[Query { record: 1, ids: &ids, from: 3 }], 1, &mut |_, _, pred| {
            rows.push(pred.rows());
            Ok(())
        })
        .unwrap();
        assert_eq!(rows, [2]);
        let err = t.predict(&[Query { record: 1, ids: &ids, from: 1 }], 1, &mut |_, _, _| Ok(())).unwrap_err().to_string();
        assert!(err.contains("start at token 3"), "{err}");
        assert!(t.predict(&[Query { record: 0, ids: &ids, from: 3 }], 1, &mut |_, _, _| Ok(())).is_err());
        let _ = std::fs::remove_dir_all(dir);
    }
}
