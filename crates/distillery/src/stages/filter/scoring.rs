//! Per-record scores for transfer-set selection: the teacher's confidence in a record, and
//! with a student, how far the student falls from the teacher on it (hard-example mining).
use crate::base::batch::{pad_right, sum_f64};
use crate::base::progress::Progress;
use crate::model::causal_lm::{Capture, CausalLm};
use crate::teacher::{Predictions, Query, Teacher};
use crate::base::journal::Journal;
use anyhow::{ensure, Context, Result};
use serde_json::json;
use crate::base::rng::SplitMix64;
use rayon::prelude::*;
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use tch::{Kind, Tensor};

/// A token sequence and the first target index that is scored (1 for text, the prompt
/// length for prompt/completion records).
pub struct Scored {
    pub ids: Vec<i64>,
    pub from: usize,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct RecordScores {
    pub tokens: usize,
    /// Mean log-probability the teacher gives the record's tokens.
    pub teacher_logprob: f64,
    /// Mean probability of the teacher's most likely token (confidence).
    pub teacher_confidence: f64,
    /// Mean entropy of the teacher's next-token distribution (nats).
    pub teacher_entropy: f64,
    /// Mean KL(teacher || student) per token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kl_teacher_student: Option<f64>,
    /// Student NLL minus teacher NLL, per token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ce_gap: Option<f64>,
    /// The positions where the student is furthest from the teacher: (target index, KL).
    #[serde(skip)]
    pub worst: Vec<(usize, f64)>,
}

impl RecordScores {
    /// One journal line: every float as its bit pattern, so a resumed run reads back exactly
    /// what was computed.
    fn to_line(&self, i: usize) -> String {
        let bits = |v: Option<f64>| v.map(f64::to_bits);
        json!({
            "i": i,
            "tokens": self.tokens,
            "f": [self.teacher_logprob.to_bits(), self.teacher_confidence.to_bits(), self.teacher_entropy.to_bits(),
                  bits(self.kl_teacher_student), bits(self.ce_gap)],
            "worst": self.worst.iter().map(|&(p, kl)| (p, kl.to_bits())).collect::<Vec<_>>(),
        })
        .to_string()
    }

    fn from_line(line: &str) -> Result<(usize, RecordScores)> {
        #[derive(serde::Deserialize)]
        struct Line {
            i: usize,
            tokens: usize,
            f: (u64, u64, u64, Option<u64>, Option<u64>),
            worst: Vec<(usize, u64)>,
        }
        let l: Line = serde_json::from_str(line).context("reading the journal")?;
        let f = f64::from_bits;
        Ok((
            l.i,
            RecordScores {
                tokens: l.tokens,
                teacher_logprob: f(l.f.0),
                teacher_confidence: f(l.f.1),
                teacher_entropy: f(l.f.2),
                kl_teacher_student: l.f.3.map(f),
                ce_gap: l.f.4.map(f),
                worst: l.worst.into_iter().map(|(p, b)| (p, f(b))).collect(),
            },
        ))
    }
}

/// Scores every sequence with the teacher (and the student), batched. The teacher may be
/// any [`Teacher`]; with a top-k teacher the scores are the bucketed approximations that
/// [`crate::teacher::Predictions`] documents. Finished batches go to `journal`; the records
/// it restored are not scored again.
pub fn score(teacher: &dyn Teacher, student: Option<&CausalLm>, seqs: &[Scored], batch: usize, worst_k: usize, journal: &mut Journal) -> Result<Vec<RecordScores>> {
    let mut out = vec![RecordScores::default(); seqs.len()];
    for (pos, line) in journal.restored().iter().enumerate() {
        let (i, r) = RecordScores::from_line(line)?;
        ensure!(i == pos && i < seqs.len(), "the journal's records are not this run's; remove it to start over");
        out[i] = r;
    }
    let batch = batch.max(1);
    let skip = journal.done();
    ensure!(skip % batch == 0 || skip == seqs.len(), "the journal ends inside a batch; remove it to start over");
    let mut progress = Progress::new("score", (seqs.len() - skip) as u64);
    let refs: Vec<&[i64]> = seqs.iter().map(|s| s.ids.as_slice()).collect();
    // Per record: sums of target log-prob, confidence, entropy, KL and student NLL, and the
    // per-position KL for the hardest tokens.
    let mut sums = vec![[0f64; 5]; seqs.len()];
    let mut kls: Vec<Vec<f64>> = vec![vec![]; seqs.len()];
    tch::no_grad(|| -> Result<()> {
        for start in (skip..seqs.len()).step_by(batch) {
            let end = (start + batch).min(seqs.len());
            let rows: Vec<usize> = (start..end).filter(|&i| seqs[i].ids.len() > seqs[i].from.max(1)).collect();
            progress.inc((end - start) as u64, "");
            if !rows.is_empty() {
            let hs = match student {
                Some(s) => {
                    let b = pad_right(&refs, &rows, 0, s.device());
                    Some(s.forward_hidden(&b.input_ids, Some(&b.attention_mask), Capture::default(), None)?.hidden)
                }
                None => None,
            };
            let queries: Vec<Query> = rows.iter().map(|&i| Query { record: i, ids: &seqs[i].ids, from: seqs[i].from.max(1) }).collect();
            teacher.predict(&queries, queries.len(), &mut |q, off, pred| {
                let i = rows[q];
                let from = seqs[i].from.max(1);
                let len = pred.rows();
                let first = from + off as usize;
                let tgt = Tensor::from_slice(&seqs[i].ids[first..first + len as usize]).to_device(pred_device(&pred));
                let t_lp = pred.target_logprobs(&tgt);
                let s = &mut sums[i];
                s[0] += sum_f64(&t_lp);
                s[1] += sum_f64(&pred.confidence());
                s[2] += sum_f64(&pred.entropy());
                if let (Some(student), Some(hs)) = (student, &hs) {
                    let h = hs.get(q as i64).narrow(0, (first - 1) as i64, len);
                    let ls = student.logits(&h).to_kind(Kind::Float).log_softmax(-1, Kind::Float);
                    let kl = pred.kl_to(&ls);
                    s[3] += sum_f64(&kl);
                    s[4] -= sum_f64(&ls.gather(1, &tgt.unsqueeze(1), false));
                    kls[i].extend(Vec::<f64>::try_from(kl.to_kind(Kind::Double).to_device(tch::Device::Cpu))?);
                }
                Ok(())
            })?;
            }
            for i in start..end {
                finish_record(&mut out[i], &seqs[i], sums[i], &kls[i], student.is_some(), worst_k);
                journal.push(out[i].to_line(i));
            }
            if journal.due() || end == seqs.len() {
                journal.commit(None)?;
            }
        }
        Ok(())
    })?;
    progress.finish();
    Ok(out)
}

/// A record's means from its sums, and its hardest tokens.
fn finish_record(rec: &mut RecordScores, s: &Scored, sums: [f64; 5], kls: &[f64], with_student: bool, worst_k: usize) {
    let from = s.from.max(1);
    if s.ids.len() <= from {
        return;
    }
    let n = (s.ids.len() - from) as f64;
    let [lp, conf, ent, kl, s_nll] = sums;
    rec.tokens = n as usize;
    rec.teacher_logprob = lp / n;
    rec.teacher_confidence = conf / n;
    rec.teacher_entropy = ent / n;
    if with_student {
        rec.kl_teacher_student = Some(kl / n);
        rec.ce_gap = Some(s_nll / n + rec.teacher_logprob);
        let mut order: Vec<usize> = (0..kls.len()).collect();
        order.sort_by(|&a, &b| kls[b].total_cmp(&kls[a]));
        rec.worst = order.into_iter().take(worst_k).map(|p| (p + from, kls[p])).collect();
    }
}

fn pred_device(p: &Predictions) -> tch::Device {
    match p {
        Predictions::Dense(t) => t.device(),
        Predictions::TopK(s) => s.indices.device(),
    }
}

/// Word 3-gram shingles of a text, lower-cased.
fn shingles(text: &str) -> HashSet<u64> {
    use std::hash::{Hash, Hasher};
    let words: Vec<String> = text.split_whitespace().map(|w| w.to_lowercase()).collect();
    let n = 3.min(words.len().max(1));
    words
        .windows(n)
        .map(|w| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            w.hash(&mut h);
            h.finish()
        })
        .collect()
}

const PERMS: usize = 64;
const BANDS: usize = 16;

fn minhash(text: &str) -> Vec<u64> {
    let sh = shingles(text);
    (0..PERMS)
        .map(|k| {
            let mut rng = SplitMix64::for_key(0x5eed, k as u64);
            let (a, b) = (rng.next_u64() | 1, rng.next_u64());
            sh.iter().map(|&x| x.wrapping_mul(a).wrapping_add(b)).min().unwrap_or(u64::MAX)
        })
        .collect()
}

/// Indices of near-duplicates to drop: a text whose estimated word-3-gram Jaccard
/// similarity with an earlier kept text reaches `threshold` (MinHash, 64 permutations,
/// LSH in 16 bands of 4 to find candidates).
pub fn near_duplicates(texts: &[String], threshold: f64) -> HashSet<usize> {
    let sigs: Vec<Vec<u64>> = texts.par_iter().map(|t| minhash(t)).collect();
    let rows = PERMS / BANDS;
    let mut buckets: HashMap<(usize, Vec<u64>), Vec<usize>> = HashMap::new();
    let mut drop = HashSet::new();
    for (i, sig) in sigs.iter().enumerate() {
        let mut candidates = HashSet::new();
        for band in 0..BANDS {
            let key = (band, sig[band * rows..(band + 1) * rows].to_vec());
            if let Some(list) = buckets.get(&key) {
                candidates.extend(list.iter().copied());
            }
        }
        let dup = candidates.into_iter().any(|j| {
            let same = sigs[j].iter().zip(sig).filter(|(a, b)| a == b).count();
            same as f64 / PERMS as f64 >= threshold
        });
        if dup {
            drop.insert(i);
            continue;
        }
        for band in 0..BANDS {
            buckets.entry((band, sig[band * rows..(band + 1) * rows].to_vec())).or_default().push(i);
        }
    }
    drop
}
