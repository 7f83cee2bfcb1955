//! Held-out metrics as CONTRACT.md defines them: perplexity over every predicted token, and
//! against a teacher the mean KL(teacher || model) and top-1 agreement at the same positions.
use crate::model::{Capture, CausalLm};
use crate::runtime::Progress;
use anyhow::{bail, Result};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

/// Token sequences packed into right-padded batches.
pub struct Batch {
    /// `[b, t]` int64
    pub input_ids: Tensor,
    /// `[b, t]` int64, 1 for real tokens
    pub attention_mask: Tensor,
    /// Indices of the sequences in this batch, in the caller's order.
    pub rows: Vec<usize>,
}

/// Groups sequences of similar length (sorted by length) into batches of at most
/// `batch_size` sequences, right-padded with `pad`.
pub fn length_sorted_batches(seqs: &[Vec<i64>], batch_size: usize, pad: i64, device: Device) -> Vec<Batch> {
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(seqs[i].len()));
    order.chunks(batch_size.max(1)).map(|rows| pad_batch(seqs, rows, pad, device)).collect()
}

pub fn pad_batch(seqs: &[Vec<i64>], rows: &[usize], pad: i64, device: Device) -> Batch {
    let t = rows.iter().map(|&i| seqs[i].len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(rows.len() * t);
    let mut mask = Vec::with_capacity(rows.len() * t);
    for &i in rows {
        let s = &seqs[i];
        ids.extend_from_slice(s);
        ids.extend(std::iter::repeat_n(pad, t - s.len()));
        mask.extend(std::iter::repeat_n(1i64, s.len()));
        mask.extend(std::iter::repeat_n(0i64, t - s.len()));
    }
    let shape = [rows.len() as i64, t as i64];
    Batch {
        input_ids: Tensor::from_slice(&ids).view(shape).to_device(device),
        attention_mask: Tensor::from_slice(&mask).view(shape).to_device(device),
        rows: rows.to_vec(),
    }
}

/// Runs `model` (no grad) over `seqs` in right-padded batches of `batch` sequences and calls
/// `f(i, states)` with sequence `i`'s final hidden states `[len_i, hidden]`.
pub fn for_each_hidden(model: &CausalLm, seqs: &[Vec<i64>], batch: usize, mut f: impl FnMut(usize, &Tensor)) {
    tch::no_grad(|| {
        for start in (0..seqs.len()).step_by(batch.max(1)) {
            let rows: Vec<usize> = (start..(start + batch.max(1)).min(seqs.len())).collect();
            let b = pad_batch(seqs, &rows, 0, model.device());
            let h = model.forward_hidden(&b.input_ids, Some(&b.attention_mask), Capture::default(), None).hidden;
            for (r, &i) in rows.iter().enumerate() {
                f(i, &h.get(r as i64).narrow(0, 0, seqs[i].len() as i64));
            }
        }
    });
}

/// Positions that predict a real next token: `[b, t-1]` bool (position i predicts token i+1).
pub fn predicted_positions(attention_mask: &Tensor) -> Tensor {
    let t = attention_mask.size()[1];
    attention_mask.narrow(1, 1, t - 1).ne(0)
}

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
}

/// Perplexity of `model` (and KL/agreement against `teacher`) over `seqs`.
pub fn evaluate(
    model: &CausalLm,
    teacher: Option<&CausalLm>,
    seqs: &[Vec<i64>],
    batch_size: usize,
    show_progress: bool,
) -> Result<EvalMetrics> {
    let seqs: Vec<Vec<i64>> = seqs.iter().filter(|s| s.len() >= 2).cloned().collect();
    if seqs.is_empty() {
        bail!("no record has at least two tokens; nothing to predict");
    }
    if let Some(t) = teacher {
        if t.config.vocab_size != model.config.vocab_size {
            bail!(
                "teacher vocabulary ({}) differs from the model's ({}); KL needs a shared tokenizer",
                t.config.vocab_size,
                model.config.vocab_size
            );
        }
    }
    let max_len = seqs.iter().map(Vec::len).max().unwrap() as i64;
    for m in std::iter::once(model).chain(teacher) {
        if m.config.arch == crate::config::Arch::Gpt2 && max_len > m.config.max_position_embeddings {
            bail!(
                "a record has {max_len} tokens, more than the model's {} positions; shorten it or pass --max-length",
                m.config.max_position_embeddings
            );
        }
    }
    let device = model.device();
    let batches = length_sorted_batches(&seqs, batch_size, 0, device);
    let mut progress = show_progress.then(|| Progress::new("eval", seqs.len() as u64));
    let (mut nll, mut kl, mut agree, mut t_nll, mut count) = (0f64, 0f64, 0f64, 0f64, 0i64);
    tch::no_grad(|| {
        for batch in &batches {
            let valid = predicted_positions(&batch.attention_mask).flatten(0, 1);
            let t = batch.input_ids.size()[1];
            let targets = batch.input_ids.narrow(1, 1, t - 1).flatten(0, 1).masked_select(&valid);
            let hidden_at = |m: &CausalLm| -> Tensor {
                let out = m.forward_hidden(&batch.input_ids, Some(&batch.attention_mask), Capture::default(), None);
                let h = out.hidden.narrow(1, 0, t - 1);
                let hdim = h.size()[2];
                h.flatten(0, 1).index_select(0, &valid.nonzero().squeeze_dim(1)).view([-1, hdim])
            };
            let hs = hidden_at(model);
            let ht = teacher.map(hidden_at);
            let n = targets.size()[0];
            let chunk = crate::losses::chunk_rows(0, model.config.vocab_size, model.device());
            for (start, len) in crate::losses::row_chunks(n, chunk) {
                let tgt = targets.narrow(0, start, len);
                let ls = model.logits(&hs.narrow(0, start, len)).to_kind(Kind::Float).log_softmax(-1, Kind::Float);
                nll -= ls.gather(1, &tgt.unsqueeze(1), false).sum(Kind::Double).double_value(&[]);
                if let (Some(teacher), Some(ht)) = (teacher, &ht) {
                    let lt = teacher.logits(&ht.narrow(0, start, len)).to_kind(Kind::Float).log_softmax(-1, Kind::Float);
                    t_nll -= lt.gather(1, &tgt.unsqueeze(1), false).sum(Kind::Double).double_value(&[]);
                    kl += (lt.exp() * (&lt - &ls)).sum(Kind::Double).double_value(&[]);
                    agree += lt.argmax(-1, false).eq_tensor(&ls.argmax(-1, false)).sum(Kind::Double).double_value(&[]);
                }
            }
            count += n;
            if let Some(p) = progress.as_mut() {
                p.inc(batch.rows.len() as u64, "");
            }
        }
    });
    if let Some(p) = &progress {
        p.finish();
    }
    let c = count as f64;
    Ok(EvalMetrics {
        records: seqs.len(),
        tokens: count,
        nll: nll / c,
        perplexity: (nll / c).exp(),
        teacher_kl: teacher.map(|_| kl / c),
        top1_agreement: teacher.map(|_| agree / c),
        teacher_perplexity: teacher.map(|_| (t_nll / c).exp()),
    })
}
