//! Per-record scores for transfer-set selection: the teacher's confidence in a record, and
//! with a student, how far the student falls from the teacher on it (hard-example mining).
use crate::eval::pad_batch;
use crate::model::{Capture, CausalLm};
use crate::rng::SplitMix64;
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

/// Scores every sequence with the teacher (and the student), batched.
pub fn score(teacher: &CausalLm, student: Option<&CausalLm>, seqs: &[Scored], batch: usize, worst_k: usize) -> Vec<RecordScores> {
    let ids: Vec<Vec<i64>> = seqs.iter().map(|s| s.ids.clone()).collect();
    let mut out = vec![RecordScores::default(); seqs.len()];
    let mut progress = crate::runtime::Progress::new("score", seqs.len() as u64);
    let batch = batch.max(1);
    tch::no_grad(|| {
        for start in (0..seqs.len()).step_by(batch) {
            let rows: Vec<usize> = (start..(start + batch).min(seqs.len())).collect();
            progress.inc(rows.len() as u64, "");
            let b = pad_batch(&ids, &rows, 0, teacher.device());
            let ht = teacher.forward_hidden(&b.input_ids, Some(&b.attention_mask), Capture::default(), None).hidden;
            let hs = student.map(|s| s.forward_hidden(&b.input_ids, Some(&b.attention_mask), Capture::default(), None).hidden);
            for (r, &i) in rows.iter().enumerate() {
                let s = &seqs[i];
                let from = s.from.max(1);
                if s.ids.len() <= from {
                    continue;
                }
                let n = (s.ids.len() - from) as i64;
                let tgt = Tensor::from_slice(&s.ids[from..]).to_device(teacher.device()).unsqueeze(1);
                let lt = teacher.logits(&ht.get(r as i64).narrow(0, from as i64 - 1, n)).to_kind(Kind::Float).log_softmax(-1, Kind::Float);
                let pt = lt.exp();
                let mean = |t: Tensor| t.mean(Kind::Double).double_value(&[]);
                let rec = &mut out[i];
                rec.tokens = n as usize;
                let t_lp = lt.gather(1, &tgt, false);
                rec.teacher_logprob = mean(t_lp.shallow_clone());
                rec.teacher_confidence = mean(pt.max_dim(-1, false).0);
                rec.teacher_entropy = mean((&pt * &lt).sum_dim_intlist(-1, false, Kind::Float).neg());
                if let (Some(student), Some(hs)) = (student, &hs) {
                    let ls = student.logits(&hs.get(r as i64).narrow(0, from as i64 - 1, n)).to_kind(Kind::Float).log_softmax(-1, Kind::Float);
                    let kl = (&pt * (&lt - &ls)).sum_dim_intlist(-1, false, Kind::Float);
                    rec.kl_teacher_student = Some(mean(kl.shallow_clone()));
                    rec.ce_gap = Some(mean(ls.gather(1, &tgt, false).neg()) + rec.teacher_logprob);
                    let kl: Vec<f64> = Vec::<f64>::try_from(kl.to_kind(Kind::Double).to_device(tch::Device::Cpu)).unwrap();
                    let mut order: Vec<usize> = (0..kl.len()).collect();
                    order.sort_by(|&a, &b| kl[b].total_cmp(&kl[a]));
                    rec.worst = order.into_iter().take(worst_k).map(|p| (p + from, kl[p])).collect();
                }
            }
        }
    });
    progress.finish();
    out
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
