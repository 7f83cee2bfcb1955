//! Training examples from JSONL records, and the deterministic batch order.
use crate::records::{ids_field, text_parts, Record};
use crate::rng::SplitMix64;
use crate::tokenizer::Tok;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// One training sequence. Position `i` predicts `ids[i + 1]`; the loss covers targets from
/// index `loss_from` on (1 for plain text, the prompt length for prompt/completion records).
#[derive(Clone, Debug)]
pub struct Example {
    pub ids: Vec<i64>,
    pub loss_from: usize,
    /// Offline teacher rows (`teacher_logits` pointer), one per loss target.
    pub teacher_rows: Option<Value>,
}

impl Example {
    pub fn loss_targets(&self) -> usize {
        self.ids.len().saturating_sub(self.loss_from.max(1))
    }
}

/// Builds examples: stored `prompt_ids`/`completion_ids` are used as they are (they come from
/// the teacher's tokenizer, which the student shares); otherwise text is tokenized with
/// special tokens, a completion appended without them. Sequences are cut at `seq_len`.
pub fn build_examples(
    records: &[(usize, Record)],
    path: &Path,
    tok: &Tok,
    seq_len: usize,
    include_prompt: bool,
    offline: bool,
) -> Result<Vec<Example>> {
    let mut out = Vec::with_capacity(records.len());
    for (line, rec) in records {
        let at = || format!("{}:{line}", path.display());
        let (mut ids, mut loss_from) = match (ids_field(rec, "prompt_ids").with_context(at)?, ids_field(rec, "completion_ids").with_context(at)?) {
            (Some(p), Some(c)) => {
                let from = p.len();
                (p.into_iter().chain(c).collect::<Vec<_>>(), from)
            }
            _ => {
                let (context, completion) = text_parts(rec).with_context(at)?;
                let mut ids = tok.encode(&context, true).with_context(at)?;
                let from = ids.len();
                match completion {
                    Some(c) => {
                        ids.extend(tok.encode(&c, false).with_context(at)?);
                        (ids, from)
                    }
                    None => (ids, 1),
                }
            }
        };
        if include_prompt {
            loss_from = 1;
        }
        ids.truncate(seq_len);
        let teacher_rows = if offline {
            let p = rec.get("teacher_logits").cloned().with_context(|| format!("{}: no `teacher_logits` pointer (offline mode needs kd-generate --store-logits output)", at()))?;
            if include_prompt && loss_from < rec_prompt_len(rec) {
                bail!("{}: offline teacher logits cover the completion only; drop --include-prompt-loss", at());
            }
            Some(p)
        } else {
            None
        };
        let ex = Example { ids, loss_from: loss_from.max(1), teacher_rows };
        if ex.loss_targets() == 0 {
            continue; // nothing to learn from (e.g. a prompt cut off by --seq-len)
        }
        out.push(ex);
    }
    if out.is_empty() {
        bail!("{}: no record has a token to train on", path.display());
    }
    Ok(out)
}

fn rec_prompt_len(rec: &Record) -> usize {
    ids_field(rec, "prompt_ids").ok().flatten().map_or(1, |p| p.len())
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
            let mut rng = SplitMix64::for_key(self.seed, epoch as u64);
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
}

impl TrainBatch {
    pub fn new(examples: &[Example], which: &[usize], device: Device) -> TrainBatch {
        let t = which.iter().map(|&i| examples[i].ids.len()).max().unwrap_or(2).max(2);
        let (mut ids, mut mask, mut pos, mut tgt) = (vec![], vec![], vec![], vec![]);
        for (row, &i) in which.iter().enumerate() {
            let ex = &examples[i];
            let n = ex.ids.len();
            ids.extend_from_slice(&ex.ids);
            ids.extend(std::iter::repeat_n(0i64, t - n));
            mask.extend(std::iter::repeat_n(1i64, n));
            mask.extend(std::iter::repeat_n(0i64, t - n));
            for target in ex.loss_from.max(1)..n {
                pos.push((row * (t - 1) + target - 1) as i64);
                tgt.push(ex.ids[target]);
            }
        }
        let shape = [which.len() as i64, t as i64];
        TrainBatch {
            input_ids: Tensor::from_slice(&ids).view(shape).to_device(device),
            attention_mask: Tensor::from_slice(&mask).view(shape).to_device(device),
            loss_positions: Tensor::from_slice(&pos).to_kind(Kind::Int64).to_device(device),
            targets: Tensor::from_slice(&tgt).to_device(device),
            examples: which.to_vec(),
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
