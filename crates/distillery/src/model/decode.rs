//! Batched autoregressive generation with a KV cache.
//!
//! Prompts of different lengths are left-padded; positions count real tokens only, so each
//! row decodes exactly as it would alone. Sampling draws one uniform number per row and step
//! from that row's own seeded stream, so results do not depend on batch composition.
use crate::model::causal_lm::{Capture, CausalLm};
use crate::base::rng::SplitMix64;
use crate::base::batch::{pad, PadSide};
use anyhow::{bail, Context, Result};
use tch::{Kind, Tensor};

#[derive(Clone, Debug)]
pub struct Sampling {
    pub max_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    pub top_k: Option<i64>,
    pub top_p: Option<f64>,
    pub eos: Vec<i64>,
    pub pad: i64,
    /// Stop strings. A local generator applies them through its caller's stop predicate; a
    /// served teacher also sends them, so that the server stops early (the caller's rule
    /// still decides where a completion ends).
    pub stop: Vec<String>,
}

/// Applies temperature, top-k and top-p to `[b, vocab]` fp32 logits, in transformers' order.
pub fn warp_logits(logits: &Tensor, s: &Sampling) -> Tensor {
    let mut x = logits / s.temperature;
    let vocab = x.size()[1];
    if let Some(k) = s.top_k.filter(|&k| k > 0 && k < vocab) {
        let (top, _) = x.topk(k, -1, true, true);
        let kth = top.narrow(1, k - 1, 1);
        x = x.masked_fill(&x.lt_tensor(&kth), f64::NEG_INFINITY);
    }
    if let Some(p) = s.top_p.filter(|&p| p < 1.0) {
        let (sorted, idx) = x.sort(-1, false); // ascending
        let cum = sorted.softmax(-1, Kind::Float).cumsum(-1, Kind::Float);
        let remove = cum.le(1.0 - p);
        let _ = remove.narrow(1, vocab - 1, 1).fill_(0); // always keep the most likely token
        let remove = remove.scatter(1, &idx, &remove);
        x = x.masked_fill(&remove, f64::NEG_INFINITY);
    }
    x
}

/// Generates a completion for each prompt. `rngs[i]` is row i's sampling stream (unused
/// when greedy). Returns completion ids, up to and including the first EOS.
pub fn generate(model: &CausalLm, prompts: &[Vec<i64>], s: &Sampling, rngs: &mut [SplitMix64]) -> Result<Vec<Vec<i64>>> {
    generate_until(model, prompts, s, rngs, &|_| false)
}

/// As [`generate`], also ending a row as soon as `stop(completion so far)` holds (stop
/// strings); the token that completed the stop condition is kept.
pub fn generate_until(
    model: &CausalLm,
    prompts: &[Vec<i64>],
    s: &Sampling,
    rngs: &mut [SplitMix64],
    stop: &dyn Fn(&[i64]) -> bool,
) -> Result<Vec<Vec<i64>>> {
    if prompts.iter().any(Vec::is_empty) {
        bail!("cannot generate from an empty prompt (no tokens after tokenization)");
    }
    let device = model.device();
    let b = prompts.len();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    model
        .check_positions((longest + s.max_new_tokens) as i64)
        .with_context(|| format!("prompt ({longest} tokens) plus --max-new-tokens ({})", s.max_new_tokens))?;
    let refs: Vec<&[i64]> = prompts.iter().map(Vec::as_slice).collect();
    let rows: Vec<usize> = (0..b).collect();
    let first = pad(&refs, &rows, s.pad, PadSide::Left, 0, device);
    let (mut input, mut attn) = (first.input_ids, first.attention_mask);
    let mut cache = model.new_cache_for(longest + s.max_new_tokens);
    let mut out: Vec<Vec<i64>> = vec![vec![]; b];
    let mut done = vec![false; b];
    tch::no_grad(|| {
        for _ in 0..s.max_new_tokens {
            let h = model.forward_hidden(&input, Some(&attn), Capture::default(), Some(&mut cache))?.hidden;
            let t = h.size()[1];
            let logits = model.logits(&h.narrow(1, t - 1, 1).squeeze_dim(1)).to_kind(Kind::Float);
            let next = if s.temperature <= 0.0 {
                logits.argmax(-1, false)
            } else {
                let probs = warp_logits(&logits, s).softmax(-1, Kind::Float);
                let u: Vec<f32> = rngs.iter_mut().map(|r| r.next_f64() as f32).collect();
                let u = Tensor::from_slice(&u).to_device(device).unsqueeze(1);
                // Inverse CDF: the first token whose cumulative probability exceeds u.
                let cdf = probs.cumsum(-1, Kind::Float);
                let total = cdf.narrow(1, cdf.size()[1] - 1, 1);
                (u * total)
                    .searchsorted(&cdf, false, true, "right", None::<Tensor>)
                    .squeeze_dim(1)
                    .clamp_max(cdf.size()[1] - 1)
            };
            let next: Vec<i64> = Vec::<i64>::try_from(next.to_device(tch::Device::Cpu))?;
            let mut feed = next.clone();
            for i in 0..b {
                if done[i] {
                    feed[i] = s.pad;
                    continue;
                }
                out[i].push(next[i]);
                if s.eos.contains(&next[i]) || stop(&out[i]) {
                    done[i] = true;
                }
            }
            if done.iter().all(|&d| d) {
                break;
            }
            input = Tensor::from_slice(&feed).view([b as i64, 1]).to_device(device);
            attn = Tensor::cat(&[attn, Tensor::ones([b as i64, 1], (Kind::Int64, device))], 1);
        }
        Ok(out)
    })
}
