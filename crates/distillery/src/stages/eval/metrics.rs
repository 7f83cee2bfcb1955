//! Held-out metrics as CONTRACT.md defines them: perplexity over every predicted token, and
//! against a teacher the mean KL(teacher || model), top-1 agreement and the teacher's own
//! perplexity at the same positions. The teacher is any [`Teacher`]: a local model gives
//! exact figures; a top-k teacher gives the bucketed approximations [`Predictions`] states.
use crate::base::progress::Progress;
use crate::base::batch::{length_sorted_batches, sum_f64};
use crate::model::causal_lm::CausalLm;
use crate::teacher::{Predictions, Query, Teacher};
use anyhow::{bail, Result};
use serde::Serialize;
use tch::{Kind, Tensor};

#[derive(Serialize, Default, Clone, Debug)]
pub struct EvalMetrics {
    pub records: usize,
    /// Predicted positions counted.
    pub tokens: i64,
    /// Mean negative log-likelihood per predicted token (nats).
    pub nll: f64,
    pub perplexity: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub teacher_kl: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top1_agreement: Option<f64>,
    /// Teacher perplexity on the same positions, when a teacher was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub teacher_perplexity: Option<f64>,
    /// Per-record sums, in the order of the evaluated records (those with two or more
    /// tokens): what bootstrap intervals and paired comparisons resample.
    #[serde(skip)]
    pub per_record: Vec<RecordSums>,
}

/// Sums over one record's predicted positions (or over all of them).
#[derive(Default, Clone, Debug)]
pub struct RecordSums {
    pub nll: f64,
    pub kl: f64,
    pub agree: f64,
    pub teacher_nll: f64,
    pub count: i64,
}

/// Perplexity of `model` (and KL/agreement against `teacher`) over `seqs`.
pub fn evaluate(model: &CausalLm, teacher: Option<&dyn Teacher>, seqs: &[Vec<i64>], batch_size: usize, show_progress: bool) -> Result<EvalMetrics> {
    let kept: Vec<usize> = (0..seqs.len()).filter(|&i| seqs[i].len() >= 2).collect();
    if kept.is_empty() {
        bail!("no record has at least two tokens; nothing to predict");
    }
    if let Some(t) = teacher {
        if t.vocab_size() != model.config.vocab_size {
            bail!(
                "teacher vocabulary ({}) differs from the model's ({}); KL needs a shared tokenizer",
                t.vocab_size(),
                model.config.vocab_size
            );
        }
    }
    let refs: Vec<&[i64]> = kept.iter().map(|&i| seqs[i].as_slice()).collect();
    let max_len = refs.iter().map(|s| s.len()).max().unwrap() as i64;
    model.check_positions(max_len)?;
    if let Some(m) = teacher.and_then(|t| t.local()) {
        m.check_positions(max_len)?;
    }
    let device = model.device();
    let batches = length_sorted_batches(&refs, batch_size, 0, device);
    let mut progress = show_progress.then(|| Progress::new("eval", refs.len() as u64));
    let mut per_record = vec![RecordSums::default(); refs.len()];
    tch::no_grad(|| -> Result<()> {
        for batch in &batches {
            let h = model.forward_hidden(&batch.input_ids, Some(&batch.attention_mask), Default::default(), None)?.hidden;
            let queries: Vec<Query> = batch.rows.iter().map(|&r| Query { record: kept[r], ids: refs[r], from: 1 }).collect();
            // The model's log-probabilities for rows `off..off+len` of query `q`'s targets.
            let model_lp = |q: usize, off: i64, len: i64| -> Tensor {
                model.logits(&h.get(q as i64).narrow(0, off, len)).to_kind(Kind::Float).log_softmax(-1, Kind::Float)
            };
            let targets = |q: usize, off: i64, len: i64| -> Tensor {
                Tensor::from_slice(&queries[q].ids[1 + off as usize..1 + (off + len) as usize]).to_device(device)
            };
            match teacher {
                Some(t) => t.predict(&queries, queries.len(), &mut |q, off, pred: Predictions| {
                    let len = pred.rows();
                    let (ls, tgt) = (model_lp(q, off, len), targets(q, off, len));
                    let sums = &mut per_record[batch.rows[q]];
                    sums.nll -= sum_f64(&ls.gather(1, &tgt.unsqueeze(1), false));
                    sums.teacher_nll -= sum_f64(&pred.target_logprobs(&tgt));
                    sums.kl += sum_f64(&pred.kl_to(&ls));
                    sums.agree += sum_f64(&pred.argmax().eq_tensor(&ls.argmax(-1, false)));
                    sums.count += len;
                    Ok(())
                })?,
                None => {
                    let chunk = crate::base::batch::chunk_rows(0, model.config.vocab_size, device);
                    for (q, query) in queries.iter().enumerate() {
                        for (off, len) in crate::base::batch::row_chunks(query.targets(), chunk) {
                            let (ls, tgt) = (model_lp(q, off, len), targets(q, off, len));
                            let sums = &mut per_record[batch.rows[q]];
                            sums.nll -= sum_f64(&ls.gather(1, &tgt.unsqueeze(1), false));
                            sums.count += len;
                        }
                    }
                }
            }
            if let Some(p) = progress.as_mut() {
                p.inc(batch.rows.len() as u64, "");
            }
        }
        Ok(())
    })?;
    if let Some(p) = &progress {
        p.finish();
    }
    // Totals in record order: the same figures whatever the batching.
    let sums = per_record.iter().fold(RecordSums::default(), |a, r| RecordSums {
        nll: a.nll + r.nll,
        kl: a.kl + r.kl,
        agree: a.agree + r.agree,
        teacher_nll: a.teacher_nll + r.teacher_nll,
        count: a.count + r.count,
    });
    let c = sums.count as f64;
    Ok(EvalMetrics {
        records: refs.len(),
        tokens: sums.count,
        nll: sums.nll / c,
        perplexity: (sums.nll / c).exp(),
        teacher_kl: teacher.map(|_| sums.kl / c),
        top1_agreement: teacher.map(|_| sums.agree / c),
        teacher_perplexity: teacher.map(|_| (sums.teacher_nll / c).exp()),
        per_record,
    })
}
