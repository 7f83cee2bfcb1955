//! Distillation across tokenizers: the teacher and the student read the same text through
//! different vocabularies, so their next-token distributions are compared per aligned span
//! of text ([`crate::data::align`]) instead of per position.
//!
//! Within a span each side's rows (the positions predicting the span's tokens) are merged
//! into one distribution: `log_softmax(sum of the rows' log-probabilities)`, the normalised
//! element-wise product TRL's GOLD uses; a span of one token is that token's row. Then:
//! * **ULD** (Boizard et al. 2024, "Towards cross-tokenizer distillation: the Universal
//!   Logit Distillation loss"): the Wasserstein-1 distance between the two distributions
//!   sorted by probability, which needs no mapping between vocabularies; here `sum_i
//!   |p_s(i) - p_t(i)|` over the top-K of each (the shorter padded with zeros).
//! * **GOLD** (TRL's `GOLDTrainer`): tokens spelled the same in both vocabularies are
//!   matched; on them, both distributions renormalised and compared by the chosen
//!   divergence (forward/reverse KL, JSD); the unmatched tokens of each side by ULD.
//!
//! Temperature softens every row before merging; the result is scaled by T^2 as in-vocabulary
//! KD is.
use crate::model::causal_lm::CausalLm;
use crate::model::token_bytes::TokenBytes;
use crate::teacher::SparseTeacher;
use crate::train::losses::{divergence, Divergence};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CrossTokenizer {
    Uld,
    Gold,
}

impl std::str::FromStr for CrossTokenizer {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<CrossTokenizer> {
        match s {
            "uld" => Ok(CrossTokenizer::Uld),
            "gold" => Ok(CrossTokenizer::Gold),
            other => bail!("--cross-tokenizer must be uld or gold, got `{other}`"),
        }
    }
}

impl std::fmt::Display for CrossTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CrossTokenizer::Uld => "uld",
            CrossTokenizer::Gold => "gold",
        })
    }
}

/// Token ids spelled the same (same bytes) in both vocabularies, and the rest of each.
pub struct VocabMap {
    pub student: Tensor,
    pub teacher: Tensor,
    pub student_unmatched: Tensor,
    pub teacher_unmatched: Tensor,
}

impl VocabMap {
    pub fn new(student: &TokenBytes, teacher: &TokenBytes, device: Device) -> VocabMap {
        let by_bytes = teacher.ids_by_bytes(true);
        let (mut s, mut t) = (vec![], vec![]);
        let mut t_used = vec![false; teacher.len()];
        let mut s_rest = vec![];
        for id in 0..student.len() as i64 {
            match by_bytes.get(student.piece(id)) {
                Some(&j) if !t_used[j as usize] => {
                    t_used[j as usize] = true;
                    s.push(id);
                    t.push(j);
                }
                _ => s_rest.push(id),
            }
        }
        let t_rest: Vec<i64> = (0..teacher.len() as i64).filter(|&j| !t_used[j as usize]).collect();
        let ids = |v: &[i64]| Tensor::from_slice(v).to_device(device);
        VocabMap { student: ids(&s), teacher: ids(&t), student_unmatched: ids(&s_rest), teacher_unmatched: ids(&t_rest) }
    }

    pub fn matched(&self) -> i64 {
        self.student.size()[0]
    }
}

/// `[g, vocab]` merged log-distributions of `g` spans from row log-probabilities `[r, vocab]`
/// and each row's span index `[r]`.
pub fn merge_spans(row_logprobs: &Tensor, span_of_row: &Tensor, spans: i64) -> Tensor {
    let v = row_logprobs.size()[1];
    Tensor::zeros([spans, v], (Kind::Float, row_logprobs.device()))
        .index_add(0, span_of_row, row_logprobs)
        .log_softmax(-1, Kind::Float)
}

/// The `k` largest of each row of probabilities `[n, v]`, sorted, padded with zeros to `k`.
fn top_sorted(p: &Tensor, k: i64) -> Tensor {
    let (n, v) = p.size2().unwrap();
    let top = if v == 0 { Tensor::zeros([n, 0], (Kind::Float, p.device())) } else { p.topk(k.min(v), 1, true, true).0 };
    if top.size()[1] < k {
        top.constant_pad_nd([0, k - top.size()[1]])
    } else {
        top
    }
}

/// ULD per row: `sum_i |sort(p_s)_i - sort(p_t)_i|` over the top `k` of each. Inputs are
/// probabilities (not logs), each row over its own vocabulary. Returns `[n]`.
pub fn uld_rows(p_student: &Tensor, p_teacher: &Tensor, k: i64) -> Tensor {
    (top_sorted(p_student, k) - top_sorted(p_teacher, k)).abs().sum_dim_intlist(-1, false, Kind::Float)
}

/// The per-span loss `[g]` between merged student and teacher log-distributions.
pub fn span_loss(ls: &Tensor, lt: &Tensor, kind: CrossTokenizer, map: Option<&VocabMap>, d: Divergence, k: i64) -> Tensor {
    match kind {
        CrossTokenizer::Uld => uld_rows(&ls.exp(), &lt.exp(), k),
        CrossTokenizer::Gold => {
            let map = map.expect("GOLD needs the vocabulary map");
            let mut loss = Tensor::zeros([ls.size()[0]], (Kind::Float, ls.device()));
            if map.matched() > 0 {
                let sm = ls.index_select(1, &map.student);
                let tm = lt.index_select(1, &map.teacher);
                let renorm = |x: &Tensor| x - x.logsumexp([-1i64].as_slice(), true);
                loss = loss + divergence(&renorm(&tm), &renorm(&sm), d);
            }
            let su = ls.exp().index_select(1, &map.student_unmatched);
            let tu = lt.exp().index_select(1, &map.teacher_unmatched);
            loss + uld_rows(&su, &tu, k)
        }
    }
}

/// Where the teacher's rows of a micro-batch come from.
pub enum TeacherSide<'a> {
    /// A live teacher's final hidden states `[rows, h_t]`; logits chunk by chunk.
    Model { model: &'a CausalLm, hidden: Tensor },
    /// Stored top-k rows (offline), spread to the teacher's `vocab` chunk by chunk.
    TopK { rows: SparseTeacher, vocab: i64 },
}

impl TeacherSide<'_> {
    fn vocab(&self) -> i64 {
        match self {
            TeacherSide::Model { model, .. } => model.config.vocab_size,
            TeacherSide::TopK { vocab, .. } => *vocab,
        }
    }

    /// Tempered log-probabilities `[m, vocab]` of the rows at `index`.
    fn logprobs(&self, index: &Tensor, temperature: f64) -> Tensor {
        let z = match self {
            TeacherSide::Model { model, hidden } => model.logits(&hidden.index_select(0, index)).to_kind(Kind::Float),
            TeacherSide::TopK { rows, vocab } => rows.select(index).densify(*vocab),
        };
        (z / temperature).log_softmax(-1, Kind::Float)
    }
}

/// The spans of a micro-batch: for each, the rows (into the student's hidden states and the
/// teacher's rows) of the positions that predict its tokens.
pub struct SpanRows {
    pub student: Vec<Vec<i64>>,
    pub teacher: Vec<Vec<i64>>,
}

/// Settings of the cross-tokenizer term.
#[derive(Clone, Copy, Debug)]
pub struct CrossWeights {
    pub kind: CrossTokenizer,
    pub divergence: Divergence,
    pub temperature: f64,
    pub top_k: i64,
    /// Rows of `[rows, vocab]` fp32 logits per chunk (0: automatic).
    pub chunk: i64,
}

/// The summed span loss over all spans, chunk by chunk (only one chunk of both sides' logits
/// alive at a time). With `backward`, each chunk's `sum * scale` is back-propagated into
/// `s_hidden` (a leaf `[rs, h]`), so the gradient reaches the student's head and, through the
/// leaf, its body.
#[allow(clippy::too_many_arguments)]
pub fn chunked_span_loss(
    student: &CausalLm,
    s_hidden: &Tensor,
    teacher: &TeacherSide,
    spans: &SpanRows,
    map: Option<&VocabMap>,
    w: &CrossWeights,
    scale: f64,
    backward: bool,
) -> f64 {
    let device = s_hidden.device();
    let vocab = student.config.vocab_size.max(teacher.vocab());
    let budget = if w.chunk > 0 { w.chunk } else { crate::base::batch::chunk_rows(0, vocab, device) }.max(1);
    let t2 = w.temperature * w.temperature;
    let mut total = 0.0;
    let mut start = 0;
    while start < spans.student.len() {
        // Spans whose rows fit the chunk (at least one span).
        let mut end = start;
        let mut rows = 0;
        while end < spans.student.len() && (end == start || rows + spans.student[end].len().max(spans.teacher[end].len()) as i64 <= budget) {
            rows += spans.student[end].len().max(spans.teacher[end].len()) as i64;
            end += 1;
        }
        let gather = |lists: &[Vec<i64>]| {
            let rows: Vec<i64> = lists.iter().flatten().copied().collect();
            let span: Vec<i64> = lists.iter().enumerate().flat_map(|(g, l)| std::iter::repeat_n(g as i64, l.len())).collect();
            (Tensor::from_slice(&rows).to_device(device), Tensor::from_slice(&span).to_device(device))
        };
        let (s_rows, s_span) = gather(&spans.student[start..end]);
        let (t_rows, t_span) = gather(&spans.teacher[start..end]);
        let n = (end - start) as i64;
        let lt = tch::no_grad(|| merge_spans(&teacher.logprobs(&t_rows, w.temperature), &t_span, n));
        let logits = student.logits(&s_hidden.index_select(0, &s_rows)).to_kind(Kind::Float) / w.temperature;
        let ls = merge_spans(&logits.log_softmax(-1, Kind::Float), &s_span, n);
        let loss = span_loss(&ls, &lt, w.kind, map, w.divergence, w.top_k).sum(Kind::Float) * t2;
        total += loss.double_value(&[]);
        if backward {
            (loss * scale).backward();
        }
        start = end;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merging_one_row_is_that_row_and_two_rows_their_normalised_product() {
        let lp = Tensor::from_slice(&[0.5f32, 0.3, 0.2, 0.1, 0.1, 0.8]).view([2, 3]).log();
        let one = merge_spans(&lp, &Tensor::from_slice(&[0i64, 1]), 2);
        assert!(one.allclose(&lp, 1e-6, 1e-6, false));
        let two = merge_spans(&lp, &Tensor::from_slice(&[0i64, 0]), 1).exp();
        let prod = [0.05f64, 0.03, 0.16];
        let z: f64 = prod.iter().sum();
        for (i, p) in prod.iter().enumerate() {
            assert!((two.double_value(&[0, i as i64]) - p / z).abs() < 1e-6);
        }
    }

    #[test]
    fn uld_sorts_and_pads() {
        // Same sorted profile over different vocabularies and orders: distance 0.
        let a = Tensor::from_slice(&[0.1f32, 0.7, 0.2]).view([1, 3]);
        let b = Tensor::from_slice(&[0.2f32, 0.0, 0.1, 0.7, 0.0]).view([1, 5]);
        assert!(uld_rows(&a, &b, 8).double_value(&[0]).abs() < 1e-7);
        let c = Tensor::from_slice(&[1.0f32, 0.0]).view([1, 2]);
        assert!((uld_rows(&a, &c, 3).double_value(&[0]) - (0.3 + 0.2 + 0.1)).abs() < 1e-6);
    }
}
