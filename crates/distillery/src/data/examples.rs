//! Training examples from JSONL records, and the deterministic batch order.
use crate::data::encode::{record_tokens, Layout, RecordTokens};
use crate::data::records::Record;
use crate::base::rng::{stream, Stream};
use crate::model::tokenizer::Tok;
use anyhow::{bail, ensure, Context, Result};
use std::path::Path;
use crate::base::batch::{pad, PadSide};
use tch::{Device, Kind, Tensor};

/// One training sequence. Position `i` predicts `ids[i + 1]`; the loss covers targets from
/// index `loss_from` on (1 for plain text, the prompt length for prompt/completion records).
#[derive(Clone, Debug)]
pub struct Example {
    pub ids: Vec<i64>,
    pub loss_from: usize,
    /// Index of the record it came from (stored teacher rows are found by it).
    pub record: usize,
    /// Tokens of the record's prompt (0 for plain text): what on-policy batches complete.
    pub prompt_len: usize,
}

impl Example {
    pub fn loss_targets(&self) -> usize {
        self.ids.len().saturating_sub(self.loss_from.max(1))
    }
}

/// Builds examples by the one record-to-ids rule ([`record_tokens`], split layout), cut at
/// `seq_len`. Records with nothing left to learn from (a prompt cut off by `seq_len`) are
/// skipped; with `prompts_suffice` (every batch's completions are sampled during training) a
/// prompt alone is enough when a completion token still fits. `offline` checks that every
/// record points at stored teacher logits.
pub fn build_examples(
    records: &[(usize, Record)],
    path: &Path,
    tok: &Tok,
    seq_len: usize,
    include_prompt: bool,
    offline: bool,
    prompts_suffice: bool,
) -> Result<Vec<Example>> {
    let mut out = Vec::with_capacity(records.len());
    for (index, (line, rec)) in records.iter().enumerate() {
        let at = || format!("{}:{line}", path.display());
        let RecordTokens { mut ids, prompt_len } = record_tokens(rec, tok, Layout::Split).with_context(at)?;
        if offline {
            ensure!(
                rec.contains_key("teacher_logits"),
                "{}: no `teacher_logits` pointer (offline mode needs kd-generate --store-logits output)",
                at()
            );
            if include_prompt && prompt_len > 1 {
                bail!("{}: offline teacher logits cover the completion only; drop --include-prompt-loss", at());
            }
        }
        ids.truncate(seq_len);
        // Plain text has no prompt to complete (its "prompt" is the first token).
        let has_prompt = rec.contains_key("prompt") || rec.contains_key("prompt_ids");
        let prompt_len = if has_prompt { prompt_len.min(ids.len()) } else { 0 };
        let loss_from = if include_prompt || !has_prompt { 1 } else { prompt_len };
        let ex = Example { ids, loss_from, record: index, prompt_len };
        let sampled_fits = prompts_suffice && prompt_len > 0 && prompt_len < seq_len;
        if ex.loss_targets() == 0 && !sampled_fits {
            continue;
        }
        out.push(ex);
    }
    if out.is_empty() {
        bail!("{}: no record has a token to train on", path.display());
    }
    Ok(out)
}

/// The order examples are visited in: a fresh seeded permutation per epoch, so the example
/// at any global slot is known without replaying earlier steps (exact resume).
pub struct Sampler {
    n: usize,
    seed: u64,
    epoch: Option<(usize, Vec<usize>)>,
}

impl Sampler {
    pub fn new(n: usize, seed: u64) -> Sampler {
        Sampler { n, seed, epoch: None }
    }

    pub fn at(&mut self, slot: usize) -> usize {
        let epoch = slot / self.n;
        if self.epoch.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut rng = stream(self.seed, Stream::Epoch(epoch));
            let mut perm: Vec<usize> = (0..self.n).collect();
            for i in (1..self.n).rev() {
                perm.swap(i, rng.below(i + 1));
            }
            self.epoch = Some((epoch, perm));
        }
        self.epoch.as_ref().unwrap().1[slot % self.n]
    }
}

/// A right-padded micro-batch with its loss positions.
pub struct TrainBatch {
    /// `[b, t]`
    pub input_ids: Tensor,
    /// `[b, t]` int64
    pub attention_mask: Tensor,
    /// Flat indices into `[b * (t - 1)]` of positions with a loss target, row-major.
    pub loss_positions: Tensor,
    /// `[n]` next tokens at those positions.
    pub targets: Tensor,
    pub examples: Vec<usize>,
    /// Each row's ids and first target (what a served teacher is sent to score).
    pub sequences: Vec<(Vec<i64>, usize)>,
}

impl TrainBatch {
    pub fn new(examples: &[Example], which: &[usize], device: Device) -> TrainBatch {
        let seqs: Vec<&[i64]> = examples.iter().map(|e| e.ids.as_slice()).collect();
        let padded = pad(&seqs, which, 0, PadSide::Right, 2, device);
        let t = padded.input_ids.size()[1] as usize;
        let (mut pos, mut tgt) = (vec![], vec![]);
        for (row, &i) in which.iter().enumerate() {
            let ex = &examples[i];
            for target in ex.loss_from.max(1)..ex.ids.len() {
                pos.push((row * (t - 1) + target - 1) as i64);
                tgt.push(ex.ids[target]);
            }
        }
        TrainBatch {
            input_ids: padded.input_ids,
            attention_mask: padded.attention_mask,
            loss_positions: Tensor::from_slice(&pos).to_kind(Kind::Int64).to_device(device),
            targets: Tensor::from_slice(&tgt).to_device(device),
            examples: which.to_vec(),
            sequences: which.iter().map(|&i| (examples[i].ids.clone(), examples[i].loss_from.max(1))).collect(),
        }
    }

    pub fn loss_tokens(&self) -> i64 {
        self.targets.size()[0]
    }

    pub fn valid_tokens(&self) -> i64 {
        self.attention_mask.sum(Kind::Int64).int64_value(&[])
    }

    /// Gathers `[b, t, h]` states at the loss positions: `[n, h]`.
    pub fn at_loss_positions(&self, states: &Tensor) -> Tensor {
        let (b, t, h) = states.size3().unwrap();
        let _ = b;
        states.narrow(1, 0, t - 1).reshape([-1, h]).index_select(0, &self.loss_positions)
    }
}
