//! Held-out metrics as CONTRACT.md defines them: perplexity over every predicted token, and
//! against a teacher the mean KL(teacher || model), top-1 agreement and the teacher's own
//! perplexity at the same positions. The teacher is any [`Teacher`]: a local model gives
//! exact figures; a top-k teacher gives the bucketed approximations [`Predictions`] states.
use crate::base::batch::{length_sorted_batches, sum_f64};
use crate::base::journal::Journal;
use crate::base::progress::Progress;
use crate::model::causal_lm::CausalLm;
use crate::teacher::{Predictions, Query, Teacher};
use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};
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

impl RecordSums {
    /// A journal entry for one record, floats as bit patterns so that a resumed run
    /// continues from exactly the same values.
    pub fn to_json(&self, record: usize) -> Value {
        json!([record, self.nll.to_bits(), self.kl.to_bits(), self.agree.to_bits(), self.teacher_nll.to_bits(), self.count])
    }

    pub fn from_json(v: &Value) -> Option<(usize, RecordSums)> {
        let a = v.as_array()?;
        let bits = |i: usize| a.get(i).and_then(Value::as_u64).map(f64::from_bits);
        Some((
            a.first()?.as_u64()? as usize,
            RecordSums { nll: bits(1)?, kl: bits(2)?, agree: bits(3)?, teacher_nll: bits(4)?, count: a.get(5)?.as_i64()? },
        ))
    }
}

/// Perplexity of `model` (and KL/agreement against `teacher`) over `seqs`. With a journal,
/// each finished batch's per-record sums are committed, and a resumed run starts after the
/// last committed batch (one journal item per batch).
pub fn evaluate(
    model: &CausalLm,
    teacher: Option<&dyn Teacher>,
    seqs: &[Vec<i64>],
    batch_size: usize,
    show_progress: bool,
    mut journal: Option<&mut Journal>,
) -> Result<EvalMetrics> {
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
    let mut skip = 0;
    if let Some(j) = journal.as_ref() {
        for (b, line) in j.restored().iter().enumerate() {
            let v: Value = serde_json::from_str(line).context("reading the journal")?;
            ensure!(v["batch"].as_u64() == Some(b as u64) && b < batches.len(), "the journal's batches are not this run's; remove it to start over");
            for r in v["records"].as_array().context("journal line without `records`")? {
                let (i, sums) = RecordSums::from_json(r).context("a journal record is malformed")?;
                ensure!(i < per_record.len(), "the journal's records are not this run's; remove it to start over");
                per_record[i] = sums;
            }
        }
        skip = j.restored().len();
    }
    tch::no_grad(|| -> Result<()> {
        for (b, batch) in batches.iter().enumerate().skip(skip) {
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
            if let Some(j) = journal.as_deref_mut() {
                let records: Vec<Value> = batch.rows.iter().map(|&r| per_record[r].to_json(r)).collect();
                j.push(json!({"batch": b, "records": records}).to_string());
                if j.due() || b + 1 == batches.len() {
                    j.commit(None)?;
                }
            }
        }
        Ok(())
    })?;
    if let Some(p) = &progress {
        p.finish();
    }
    Ok(EvalMetrics::from_records(per_record, teacher.is_some()))
}

impl EvalMetrics {
    /// The token-weighted metrics of per-record sums, totalled in record order: the same
    /// figures whatever the batching, and what kd-merge recombines shards with.
    pub fn from_records(per_record: Vec<RecordSums>, with_teacher: bool) -> EvalMetrics {
        let sums = per_record.iter().fold(RecordSums::default(), |a, r| RecordSums {
            nll: a.nll + r.nll,
            kl: a.kl + r.kl,
            agree: a.agree + r.agree,
            teacher_nll: a.teacher_nll + r.teacher_nll,
            count: a.count + r.count,
        });
        let c = sums.count as f64;
        let with = |v: f64| with_teacher.then_some(v);
        EvalMetrics {
            records: per_record.len(),
            tokens: sums.count,
            nll: sums.nll / c,
            perplexity: (sums.nll / c).exp(),
            teacher_kl: with(sums.kl / c),
            top1_agreement: with(sums.agree / c),
            teacher_perplexity: with((sums.teacher_nll / c).exp()),
            per_record,
        }
    }
}
