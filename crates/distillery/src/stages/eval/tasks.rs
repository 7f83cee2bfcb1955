//! Benchmark-style evaluation: multiple choice scored by log-likelihood (as lm-eval's `acc`
//! and `acc_norm`), LAMBADA-style cloze by greedy decoding, ROUGE-L of generated
//! completions, and speed (latency at batch 1, throughput at batch N).
use crate::model::decode::{generate, Sampling};
use crate::model::CausalLm;
use crate::data::records::{id_of, str_field, Record};
use crate::base::rng::SplitMix64;
use crate::base::stats::median_range;
use crate::model::tokenizer::Tok;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::Value;
use std::time::Instant;
use tch::{Kind, Tensor};

/// Sum of log-probabilities of `continuation` after `context`, for many pairs at once.
pub fn continuation_logprobs(model: &CausalLm, pairs: &[(Vec<i64>, Vec<i64>)], batch: usize) -> Result<Vec<f64>> {
    let seqs: Vec<Vec<i64>> = pairs.iter().map(|(c, x)| c.iter().chain(x).copied().collect()).collect();
    let mut out = vec![0.0; pairs.len()];
    model.for_each_hidden(&seqs, batch, |i, h| {
        let (c, x) = (pairs[i].0.len() as i64, pairs[i].1.len() as i64);
        if x == 0 {
            return;
        }
        let logits = model.logits(&h.narrow(0, c - 1, x)).to_kind(Kind::Float);
        let tgt = Tensor::from_slice(&pairs[i].1).to_device(model.device());
        out[i] = logits.log_softmax(-1, Kind::Float).gather(1, &tgt.unsqueeze(1), false).sum(Kind::Double).double_value(&[]);
    })?;
    Ok(out)
}

#[derive(Serialize, Clone, Debug)]
pub struct McResult {
    pub items: usize,
    /// Highest summed log-likelihood picks the answer.
    pub accuracy: f64,
    /// Log-likelihood divided by the choice's length in bytes (lm-eval `acc_norm`).
    pub accuracy_norm: f64,
    /// Per item, in record order: whether the highest log-likelihood was the label.
    #[serde(skip)]
    pub correct: Vec<bool>,
}

/// Multiple-choice records: `prompt` as context, `choices` as strings, `label` the index.
pub fn multiple_choice(model: &CausalLm, tok: &Tok, records: &[Record], batch: usize) -> Result<McResult> {
    let mut pairs = vec![];
    let mut items = vec![];
    for rec in records {
        let ctx = str_field(rec, "prompt")?.with_context(|| format!("record `{}`: no `prompt`", id_of(rec)))?;
        let choices: Vec<String> = rec
            .get("choices")
            .and_then(Value::as_array)
            .with_context(|| format!("record `{}`: no `choices` array", id_of(rec)))?
            .iter()
            .map(|c| c.as_str().map(String::from).with_context(|| format!("record `{}`: choices must be strings", id_of(rec))))
            .collect::<Result<_>>()?;
        let label = rec.get("label").and_then(Value::as_u64).with_context(|| format!("record `{}`: no integer `label`", id_of(rec)))? as usize;
        if label >= choices.len() {
            bail!("record `{}`: label {label} but only {} choices", id_of(rec), choices.len());
        }
        let c = tok.encode(ctx, true)?;
        let first = pairs.len();
        for ch in &choices {
            pairs.push((c.clone(), tok.encode(ch, false)?));
        }
        items.push((first, choices.iter().map(|c| c.len().max(1) as f64).collect::<Vec<_>>(), label));
    }
    let lp = continuation_logprobs(model, &pairs, batch)?;
    let argmax = |scores: Vec<f64>| scores.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i).unwrap();
    let mut acc_norm = 0usize;
    let mut correct = vec![];
    for (first, lens, label) in &items {
        let s: Vec<f64> = (0..lens.len()).map(|j| lp[first + j]).collect();
        correct.push(argmax(s.clone()) == *label);
        acc_norm += (argmax(s.iter().zip(lens).map(|(x, l)| x / l).collect()) == *label) as usize;
    }
    let n = items.len().max(1) as f64;
    let acc = correct.iter().filter(|&&c| c).count();
    Ok(McResult { items: items.len(), accuracy: acc as f64 / n, accuracy_norm: acc_norm as f64 / n, correct })
}

/// Cloze records (`prompt`, `completion` = the missing word): correct when greedy decoding
/// reproduces every token of the completion. One outcome per record, in record order.
pub fn cloze(model: &CausalLm, tok: &Tok, records: &[Record], batch: usize) -> Result<Vec<bool>> {
    let mut hits = vec![];
    let mut jobs = vec![];
    for rec in records {
        let p = str_field(rec, "prompt")?.with_context(|| format!("record `{}`: no `prompt`", id_of(rec)))?;
        let c = str_field(rec, "completion")?.with_context(|| format!("record `{}`: no `completion`", id_of(rec)))?;
        jobs.push((tok.encode(p, true)?, tok.encode(c, false)?));
    }
    for chunk in jobs.chunks(batch.max(1)) {
        let longest = chunk.iter().map(|j| j.1.len()).max().unwrap_or(1);
        let s = Sampling { max_new_tokens: longest, temperature: 0.0, top_k: None, top_p: None, eos: vec![], pad: 0, stop: vec![] };
        let prompts: Vec<Vec<i64>> = chunk.iter().map(|j| j.0.clone()).collect();
        let mut rngs = vec![SplitMix64::new(0); chunk.len()];
        let outs = generate(model, &prompts, &s, &mut rngs)?;
        for (o, j) in outs.iter().zip(chunk) {
            hits.push(o.len() >= j.1.len() && o[..j.1.len()] == j.1[..]);
        }
    }
    Ok(hits)
}

/// ROUGE-L F1 between whitespace-separated words (longest common subsequence).
pub fn rouge_l(candidate: &str, reference: &str) -> f64 {
    let a: Vec<String> = candidate.split_whitespace().map(|w| w.to_lowercase()).collect();
    let b: Vec<String> = reference.split_whitespace().map(|w| w.to_lowercase()).collect();
    if a.is_empty() || b.is_empty() {
        return 0.0;
    }
    let mut dp = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            dp[i][j] = if a[i - 1] == b[j - 1] { dp[i - 1][j - 1] + 1 } else { dp[i - 1][j].max(dp[i][j - 1]) };
        }
    }
    let lcs = dp[a.len()][b.len()] as f64;
    if lcs == 0.0 {
        return 0.0;
    }
    let (p, r) = (lcs / a.len() as f64, lcs / b.len() as f64);
    2.0 * p * r / (p + r)
}

/// Prompts as token ids: with special tokens, or rendered through the model's chat template
/// (one user turn and the generation prompt; the template carries its own special tokens).
pub fn encode_prompts(files: &crate::model::ModelFiles, tok: &Tok, prompts: &[String], chat: bool) -> Result<Vec<Vec<i64>>> {
    let template = if chat {
        Some(crate::model::tokenizer::chat_template(files)?.with_context(|| format!("--chat-template: model `{}` has no chat template", files.name))?)
    } else {
        None
    };
    prompts
        .iter()
        .map(|p| match &template {
            Some(t) => tok.encode(&crate::model::tokenizer::apply_chat_template(files, t, p)?, false),
            None => tok.encode(p, true),
        })
        .collect()
}

/// Greedy answers to text prompts (rendered through the chat template with `chat`): the
/// prompt ids and the decoded answers.
#[allow(clippy::too_many_arguments)]
pub fn greedy_answers(
    model: &CausalLm,
    files: &crate::model::ModelFiles,
    tok: &Tok,
    eos: &[i64],
    prompts: &[String],
    chat: bool,
    max_new_tokens: usize,
    batch: usize,
) -> Result<(Vec<Vec<i64>>, Vec<String>)> {
    let ids = encode_prompts(files, tok, prompts, chat)?;
    let outs = complete(model, tok, &ids, max_new_tokens, eos, batch)?;
    Ok((ids, outs))
}

/// Greedy completions for prompt ids, decoded to text.
pub fn complete(model: &CausalLm, tok: &Tok, prompts: &[Vec<i64>], max_new_tokens: usize, eos: &[i64], batch: usize) -> Result<Vec<String>> {
    let mut out = vec![];
    for ids in prompts.chunks(batch.max(1)) {
        let s = Sampling { max_new_tokens, temperature: 0.0, top_k: None, top_p: None, eos: eos.to_vec(), pad: 0, stop: vec![] };
        let mut rngs = vec![SplitMix64::new(0); ids.len()];
        for o in generate(model, &ids, &s, &mut rngs)? {
            out.push(tok.decode(&o, true)?);
        }
    }
    Ok(out)
}

#[derive(Serialize, Clone, Debug)]
pub struct Speed {
    /// Decode time per new token at batch 1 (prefill excluded), ms: the median over
    /// `speed_repeats` repetitions, with their range and every sample.
    pub latency_ms_per_token: f64,
    pub latency_ms_per_token_range: [f64; 2],
    pub latency_ms_per_token_samples: Vec<f64>,
    /// New tokens per second when decoding `batch` sequences together (median, range, samples).
    pub throughput_tokens_per_s: f64,
    pub throughput_tokens_per_s_range: [f64; 2],
    pub throughput_tokens_per_s_samples: Vec<f64>,
    pub throughput_batch: usize,
    pub speed_repeats: usize,
}

/// Times greedy decoding of `new_tokens` tokens after a fixed prompt: two warm-up runs,
/// then `repeats` rounds, each timing the three runs back to back (1 token, `new_tokens`
/// tokens, `new_tokens` at batch `batch`), so that a slow spell of a shared machine hits one
/// round rather than one measure; the median over rounds is reported with its range.
pub fn measure_speed(model: &CausalLm, prompt: &[i64], new_tokens: usize, batch: usize, repeats: usize) -> Result<Speed> {
    let s = Sampling { max_new_tokens: new_tokens, temperature: 0.0, top_k: None, top_p: None, eos: vec![], pad: 0, stop: vec![] };
    let time = |b: usize, n: usize| -> Result<f64> {
        let prompts = vec![prompt.to_vec(); b];
        let mut rngs = vec![SplitMix64::new(0); b];
        let s = Sampling { max_new_tokens: n, ..s.clone() };
        let t = Instant::now();
        generate(model, &prompts, &s, &mut rngs)?;
        Ok(t.elapsed().as_secs_f64())
    };
    time(1, new_tokens)?;
    time(batch, 2)?;
    let (mut lat, mut thr) = (vec![], vec![]);
    for _ in 0..repeats.max(1) {
        // Decode time per token = (time for n tokens - time for 1 token) / (n - 1): prefill cancels.
        let one = time(1, 1)?;
        let many = time(1, new_tokens)?;
        lat.push(1000.0 * (many - one).max(0.0) / (new_tokens - 1).max(1) as f64);
        thr.push((batch * new_tokens) as f64 / time(batch, new_tokens)?.max(1e-9));
    }
    let (l, l0, l1) = median_range(&lat);
    let (t, t0, t1) = median_range(&thr);
    Ok(Speed {
        latency_ms_per_token: l,
        latency_ms_per_token_range: [l0, l1],
        latency_ms_per_token_samples: lat,
        throughput_tokens_per_s: t,
        throughput_tokens_per_s_range: [t0, t1],
        throughput_tokens_per_s_samples: thr,
        throughput_batch: batch,
        speed_repeats: repeats.max(1),
    })
}

/// Peak resident memory of this process (VmHWM), in bytes, where Linux reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
