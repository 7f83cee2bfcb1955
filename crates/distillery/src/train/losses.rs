//! Distillation losses as pure functions over fp32 tensors.
//!
//! * [`divergence`]: per-token divergences between teacher and student distributions
//!   (forward KL, reverse KL, generalised JSD, skew KL, total variation), on any shared
//!   support: the full vocabulary, or the top-k + tail buckets of offline teacher logits.
//! * [`hidden_loss_sum`], [`attention_loss_sum`]: intermediate matching, summed over tokens.
//! * [`chunked_logit_losses`]: CE and KD over token chunks with an immediate backward per
//!   chunk, so `[tokens, vocab]` fp32 tensors of both models never exist at once.
//!
//! Every function returns sums over tokens; the caller divides by the token count of the
//! optimizer step, so means are token-weighted across micro-batches.
use crate::base::batch::{chunk_rows, row_chunks, sweep_chunk_bytes};
use crate::base::device::add_to_grad;
use crate::base::gemm::{addmm_bf16_into_f32, bf16_gemm_accumulates_in_fp32};
use crate::model::CausalLm;
use crate::train::logit_grad::{forward_kl_logit_grad, LogitGradWeights, RowSums};
pub use crate::teacher::SparseTeacher;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Divergence {
    /// KL(teacher || student): mode-covering (Hinton et al.).
    ForwardKl,
    /// KL(student || teacher): mode-seeking (MiniLLM).
    ReverseKl,
    /// beta * KL(t || m) + (1 - beta) * KL(s || m), m = beta * t + (1 - beta) * s: TRL's
    /// `generalized_jsd_loss` (GKD), whose ends are forward KL (beta 0) and reverse KL (beta 1).
    Jsd { beta: f64 },
    /// KL(t || lambda * t + (1 - lambda) * s) (DistiLLM).
    SkewKl { lambda: f64 },
    /// Total variation: 0.5 * sum |t - s|.
    Tvd,
}

impl Divergence {
    pub fn parse(name: &str, jsd_beta: f64, skew_lambda: f64) -> Result<Divergence> {
        Ok(match name {
            "forward-kl" | "kl" => Divergence::ForwardKl,
            "reverse-kl" => Divergence::ReverseKl,
            "jsd" => {
                if !(0.0..=1.0).contains(&jsd_beta) {
                    bail!("--jsd-beta must be in [0, 1] (0: forward KL, 1: reverse KL), got {jsd_beta}");
                }
                Divergence::Jsd { beta: jsd_beta }
            }
            "skew-kl" => {
                if !(skew_lambda > 0.0 && skew_lambda < 1.0) {
                    bail!("--skew-lambda must be in (0, 1), got {skew_lambda}");
                }
                Divergence::SkewKl { lambda: skew_lambda }
            }
            "tvd" => Divergence::Tvd,
            other => bail!("--divergence must be forward-kl, reverse-kl, jsd, skew-kl or tvd, got `{other}`"),
        })
    }
}

/// `sum_v p (log p - log q)` per row. Inputs are finite log-probabilities (log_softmax of
/// finite logits, or the sparse buckets whose tail is floored at log 1e-30), so no clamping
/// is needed on this hot path.
fn kl_rows(lp: &Tensor, lq: &Tensor) -> Tensor {
    (lp.exp() * (lp - lq)).sum_dim_intlist(-1, false, Kind::Float)
}

/// log(w_a * exp(la) + w_b * exp(lb)), elementwise and stable.
fn log_mix(la: &Tensor, wa: f64, lb: &Tensor, wb: f64) -> Tensor {
    Tensor::stack(&[la + wa.ln(), lb + wb.ln()], 0).logsumexp(0, false)
}

/// Per-row divergence between teacher and student log-probabilities `[n, support] -> [n]`.
pub fn divergence(lp_teacher: &Tensor, lp_student: &Tensor, d: Divergence) -> Tensor {
    match d {
        Divergence::ForwardKl => kl_rows(lp_teacher, lp_student),
        Divergence::ReverseKl => kl_rows(lp_student, lp_teacher),
        // The ends as TRL computes them (the mixture formula would give 0 there).
        Divergence::Jsd { beta } if beta == 0.0 => kl_rows(lp_teacher, lp_student),
        Divergence::Jsd { beta } if beta == 1.0 => kl_rows(lp_student, lp_teacher),
        Divergence::Jsd { beta } => {
            let lm = log_mix(lp_teacher, beta, lp_student, 1.0 - beta);
            kl_rows(lp_teacher, &lm) * beta + kl_rows(lp_student, &lm) * (1.0 - beta)
        }
        Divergence::SkewKl { lambda } => {
            let lm = log_mix(lp_teacher, lambda, lp_student, 1.0 - lambda);
            kl_rows(lp_teacher, &lm)
        }
        Divergence::Tvd => (lp_teacher.exp() - lp_student.exp()).abs().sum_dim_intlist(-1, false, Kind::Float) * 0.5,
    }
}

/// Temperature-softened KD over full logits `[n, vocab]`, scaled by T^2 so gradient
/// magnitudes do not shrink as T grows (Hinton et al.). Returns `[n]`.
pub fn kd_dense(student_logits: &Tensor, teacher_logits: &Tensor, temperature: f64, d: Divergence) -> Tensor {
    let ls = (student_logits.to_kind(Kind::Float) / temperature).log_softmax(-1, Kind::Float);
    let lt = (teacher_logits.to_kind(Kind::Float) / temperature).log_softmax(-1, Kind::Float);
    divergence(&lt, &ls, d) * (temperature * temperature)
}

/// KD against stored top-k teacher log-probabilities: both distributions are bucketed into
/// the teacher's k tokens plus one tail bucket. At T != 1 the teacher is re-tempered by
/// spreading its tail mass evenly over the other tokens. Returns `[n]`, scaled by T^2.
pub fn kd_sparse(student_logits: &Tensor, teacher: &SparseTeacher, temperature: f64, d: Divergence) -> Tensor {
    let vocab = student_logits.size()[1];
    let k = teacher.indices.size()[1];
    let ls = (student_logits.to_kind(Kind::Float) / temperature).log_softmax(-1, Kind::Float);
    let ls_top = ls.gather(1, &teacher.indices, false); // [n, k]
    // log(1 - sum p_top), computed stably from the top-k log-probabilities.
    let ls_tail = ls_top.logsumexp(-1, true).exp().neg().g_add_scalar(1.0).clamp_min(1e-30).log();
    let lt = if temperature == 1.0 {
        Tensor::cat(&[teacher.logprobs.shallow_clone(), teacher.tail_logmass.unsqueeze(1)], 1)
    } else {
        let rest = (vocab - k).max(1) as f64;
        let top = &teacher.logprobs / temperature;
        let per_tail_token = (&teacher.tail_logmass - rest.ln()) / temperature; // [n]
        let tail_bucket = per_tail_token.unsqueeze(1) + rest.ln();
        let joint = Tensor::cat(&[top, tail_bucket], 1);
        &joint - joint.logsumexp(-1, true)
    };
    let ls_b = Tensor::cat(&[ls_top, ls_tail], 1);
    divergence(&lt, &ls_b, d) * (temperature * temperature)
}

/// How hidden states are compared.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HiddenMetric {
    /// Mean squared error over the hidden dimension.
    Mse,
    /// 1 - cosine similarity.
    Cosine,
    /// Mean squared error over the teacher's mean square, per token: scale-free, so one
    /// weight suits residual streams of any magnitude (raw MSE between pre-norm hidden
    /// states can be thousands).
    NormalizedMse,
}

/// Sum over valid tokens of the per-token hidden-state distance.
///
/// # Shapes
/// `student` (already projected to the teacher's width) and `teacher`: `[b, t, h]`;
/// `valid`: `[b, t]` bool.
impl HiddenMetric {
    pub const NAMES: &'static str = "mse, normalized-mse or cosine";

    pub fn name(self) -> &'static str {
        match self {
            HiddenMetric::Mse => "mse",
            HiddenMetric::NormalizedMse => "normalized-mse",
            HiddenMetric::Cosine => "cosine",
        }
    }
}

impl std::str::FromStr for HiddenMetric {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<HiddenMetric> {
        [HiddenMetric::Mse, HiddenMetric::NormalizedMse, HiddenMetric::Cosine]
            .into_iter()
            .find(|m| m.name() == s)
            .with_context(|| format!("--hidden-metric must be {}, got `{s}`", HiddenMetric::NAMES))
    }
}

pub fn hidden_loss_sum(student: &Tensor, teacher: &Tensor, valid: &Tensor, metric: HiddenMetric) -> Tensor {
    let s = student.to_kind(Kind::Float);
    let t = teacher.to_kind(Kind::Float);
    let per_token = match metric {
        HiddenMetric::Mse => (&s - &t).square().mean_dim(-1, false, Kind::Float),
        HiddenMetric::Cosine => Tensor::cosine_similarity(&s, &t, -1, 1e-8).neg().g_add_scalar(1.0),
        HiddenMetric::NormalizedMse => {
            let scale = t.square().mean_dim(-1, false, Kind::Float).detach() + 1e-6;
            (&s - &t).square().mean_dim(-1, false, Kind::Float) / scale
        }
    };
    (per_token * valid.to_kind(Kind::Float)).sum(Kind::Float)
}

/// Averages teacher heads into one group per student head: `[b, ht, q, k] -> [b, hs, q, k]`.
/// Head `j` of the student is matched with teacher heads `j*r .. (j+1)*r`, r = ht / hs.
pub fn group_heads(teacher: &Tensor, student_heads: i64) -> Result<Tensor> {
    let (b, ht, q, k) = teacher.size4()?;
    if ht % student_heads != 0 {
        bail!("cannot match attention maps: the student's {student_heads} heads do not divide the teacher's {ht}");
    }
    Ok(teacher.view([b, student_heads, ht / student_heads, q, k]).mean_dim(2, false, Kind::Float))
}

/// Sum over valid query positions (and averaged over heads) of KL(teacher row || student row)
/// between attention distributions. `valid`: `[b, q]` bool.
pub fn attention_loss_sum(student: &Tensor, teacher: &Tensor, valid: &Tensor) -> Result<Tensor> {
    let hs = student.size()[1];
    let t = group_heads(&teacher.to_kind(Kind::Float), hs)?;
    let lt = t.clamp_min(1e-12).log();
    let ls = student.to_kind(Kind::Float).clamp_min(1e-12).log();
    let kl = (t * (lt - ls)).sum_dim_intlist(-1, false, Kind::Float); // [b, hs, q]
    let per_query = kl.mean_dim(1, false, Kind::Float);
    Ok((per_query * valid.to_kind(Kind::Float)).sum(Kind::Float))
}

/// Where the teacher's distribution at the selected positions comes from.
pub enum TeacherRows<'a> {
    /// Teacher hidden states `[n, h_t]`; logits are computed chunk by chunk.
    Online { model: &'a CausalLm, hidden: Tensor },
    /// Stored top-k log-probabilities.
    Offline(SparseTeacher),
    /// No teacher (CE-only training).
    None,
}

#[derive(Clone, Copy, Debug)]
pub struct LogitLossWeights {
    pub alpha: f64,
    pub beta: f64,
    pub temperature: f64,
    pub divergence: Divergence,
    /// Token rows per chunk (0: automatic, see [`chunk_rows`]).
    pub chunk: i64,
}

/// Sums over the rows of the unweighted CE and KD terms.
#[derive(Clone, Copy, Debug, Default)]
pub struct LogitLossSums {
    pub ce: f64,
    pub kd: f64,
}

/// CE and KD over selected positions, chunk by chunk.
///
/// `hidden` is a leaf `[n, h]` (the student's final hidden states at the positions, detached
/// with `requires_grad`); `targets` `[n]` the next tokens. When `backward` is set, each
/// chunk's `(alpha * CE + beta * KD) / normalizer` is back-propagated at once, so the
/// gradient lands in `hidden.grad()` and the output head; only one chunk of logits is alive
/// at a time.
///
/// Forward KL against a live teacher (or CE alone), the default, takes a fused path: the
/// gradient with respect to the logits is written down directly (`alpha (softmax(z) - onehot)
/// + beta T (softmax(z/T) - p_teacher)`, over the normaliser) and pushed through the output
/// head by hand, instead of recording every elementwise op for autograd. Other divergences
/// and offline logits use autograd ([`chunked_logit_losses_autograd`]); the two agree (tests).
pub fn chunked_logit_losses(
    student: &CausalLm,
    hidden: &Tensor,
    targets: &Tensor,
    teacher: &TeacherRows,
    w: &LogitLossWeights,
    normalizer: f64,
    backward: bool,
) -> LogitLossSums {
    let fused = backward && w.divergence == Divergence::ForwardKl && !matches!(teacher, TeacherRows::Offline(_));
    if !fused {
        return chunked_logit_losses_autograd(student, hidden, targets, teacher, w, normalizer, backward);
    }
    chunked_forward_kl(student, hidden, targets, teacher, w, normalizer, student.lm_head_weight())
}

/// The fused forward-KL path of [`chunked_logit_losses`], with its head gradient added to
/// `head_param`'s gradient: the fp32 master of a reduced-precision `student`, or the head
/// itself. The head gradient of every chunk is accumulated in place (`addmm_`) straight into
/// that fp32 gradient once it exists (the optimizer keeps it between steps), else into one
/// `[vocab, hidden]` buffer handed over at the end; the loss sums stay on the device and are
/// read once, so a chunk costs no host synchronisation.
pub fn chunked_forward_kl(
    student: &CausalLm,
    hidden: &Tensor,
    targets: &Tensor,
    teacher: &TeacherRows,
    w: &LogitLossWeights,
    normalizer: f64,
    head_param: &Tensor,
) -> LogitLossSums {
    let chunk = chunk_rows(w.chunk, student.config.vocab_size, hidden.device());
    let head = student.lm_head_weight();
    let device = hidden.device();
    let existing = head_param.grad();
    let in_place = existing.defined() && existing.kind() == Kind::Float && existing.size() == head.size() && existing.device() == device;
    let head_grad = if in_place { existing } else { Tensor::zeros(head.size(), (Kind::Float, device)) };
    // The hidden gradient's product runs in bf16 for a bf16 head (below); fp32 otherwise,
    // which for f16 needs an fp32 copy of the head (not made for bf16: 113 MiB at SmolLM2's).
    let head_f32 = match head.kind() {
        Kind::BFloat16 => None,
        Kind::Float => Some(head.shallow_clone()),
        _ => Some(head.to_kind(Kind::Float)),
    };
    let bf16_head_gemm_into_fp32 = head_f32.is_none() && bf16_gemm_accumulates_in_fp32(device);
    // On the CPU the elementwise work runs as one sweep per row (`logit_grad`), writing the
    // gradient in the dtype of the head products that read it, into one buffer reused by
    // every chunk; other devices and dtypes (f16) keep the libtorch ops.
    let fp32_or_bf16 = |k: Kind| matches!(k, Kind::Float | Kind::BFloat16);
    let teacher_kind = match teacher {
        TeacherRows::Online { model, .. } => Some(model.lm_head_weight().kind()),
        _ => None,
    };
    let sweep = device == Device::Cpu && fp32_or_bf16(head.kind()) && teacher_kind.is_none_or(fp32_or_bf16);
    let chunk = if sweep && w.chunk <= 0 {
        (sweep_chunk_bytes(head.kind()) / (student.config.vocab_size.max(1) * head.kind().elt_size_in_bytes() as i64)).max(16)
    } else {
        chunk
    };
    // The sweep's buffers: student logits, teacher logits, gradient. The gradient overwrites
    // the student's logits where it has their dtype (an fp32 head, or a bf16 one whose
    // gradient products run in bf16): one [rows, vocab] buffer fewer at the step's peak.
    let sweep_buffers = sweep.then(|| {
        let rows = chunk.min(hidden.size()[0]);
        let buffer = |kind: Kind| Tensor::empty([rows, student.config.vocab_size], (kind, device));
        let grad_kind = if bf16_head_gemm_into_fp32 { Kind::BFloat16 } else { Kind::Float };
        let z = buffer(head.kind());
        let g = if grad_kind == head.kind() { z.shallow_clone() } else { buffer(grad_kind) };
        (z, teacher_kind.map(buffer), g)
    });
    let host_targets = sweep.then(|| Vec::<i64>::try_from(targets).expect("targets are i64"));
    let sweep_weights = LogitGradWeights {
        ce: (w.alpha / normalizer) as f32,
        kd: (w.beta * w.temperature / normalizer) as f32,
        temperature: w.temperature as f32,
    };
    let mut swept = RowSums::default();
    let mut ce_sum = Tensor::zeros([], (Kind::Double, device));
    let mut kd_sum = Tensor::zeros([], (Kind::Double, device));
    for (start, len) in row_chunks(hidden.size()[0], chunk) {
        let h = hidden.narrow(0, start, len);
        let tgt = targets.narrow(0, start, len).unsqueeze(1);
        let grad_h = tch::no_grad(|| {
            let hd = h.detach();
            let g = if let (Some((z_buffer, y_buffer, g_buffer)), Some(host_targets)) = (&sweep_buffers, &host_targets) {
                let z = z_buffer.narrow(0, 0, len);
                student.logits_into(&hd, &z);
                let y = match (teacher, y_buffer) {
                    (TeacherRows::Online { model, hidden: ht }, Some(y_buffer)) => {
                        let y = y_buffer.narrow(0, 0, len);
                        model.logits_into(&ht.narrow(0, start, len), &y);
                        Some(y)
                    }
                    _ => None,
                };
                let g = g_buffer.narrow(0, 0, len);
                let targets = &host_targets[start as usize..(start + len) as usize];
                swept = swept + forward_kl_logit_grad(&z, y.as_ref(), targets, sweep_weights, &g).expect("logits, targets and buffer were checked");
                g
            } else {
                // Every [len, vocab] buffer below is rewritten in place once it is no longer
                // read: on CPU each fresh buffer of this size costs page faults as well as a pass.
                let mut z = student.logits(&hd).to_kind(Kind::Float); // [len, vocab]
                let ls = z.log_softmax(-1, Kind::Float);
                let _ = ce_sum.g_sub_(&ls.gather(1, &tgt, false).sum(Kind::Double));
                let scale = w.alpha / normalizer;
                // g = d(alpha * CE)/dz = alpha * (softmax(z) - onehot(target)), over the normaliser
                let mut g = match teacher {
                    TeacherRows::Online { model, hidden: ht } => {
                        let t = w.temperature;
                        let mut zt = model.logits(&ht.narrow(0, start, len)).to_kind(Kind::Float);
                        if t != 1.0 {
                            let _ = zt.g_div_scalar_(t);
                        }
                        let mut lt = zt.log_softmax(-1, Kind::Float);
                        drop(zt);
                        let mut pt = lt.exp();
                        let ls_t = if t == 1.0 {
                            ls.shallow_clone()
                        } else {
                            let _ = z.g_div_scalar_(t);
                            z.log_softmax(-1, Kind::Float)
                        };
                        drop(z);
                        let diff = lt.g_sub_(&ls_t);
                        let _ = kd_sum.g_add_(&(pt.view([-1]).dot(&diff.view([-1])).to_kind(Kind::Double) * (t * t)));
                        drop(lt);
                        // d(beta * T^2 * KL(p_t || softmax(z/T)))/dz = beta * T * (softmax(z/T) - p_t)
                        let c = w.beta * t / normalizer;
                        let _ = pt.g_mul_scalar_(c);
                        if t == 1.0 {
                            drop(ls_t);
                            let mut g = ls;
                            let _ = g.exp_().g_mul_scalar_(scale + c).g_sub_(&pt);
                            g
                        } else {
                            let mut q = ls_t;
                            let _ = q.exp_().g_mul_scalar_(c).g_sub_(&pt);
                            drop(pt);
                            let mut g = ls;
                            let _ = g.exp_().g_mul_scalar_(scale).g_add_(&q);
                            g
                        }
                    }
                    _ => {
                        let mut g = ls;
                        let _ = g.exp_().g_mul_scalar_(scale);
                        g
                    }
                };
                let _ = g.scatter_add_(1, &tgt, &Tensor::full([len, 1], -scale, (Kind::Float, g.device())));
                g
            };
            // head_grad += g^T @ h, in place; the hidden gradient g @ W goes back through autograd.
            match &head_f32 {
                // The hidden gradient is rounded to the bf16 compute copy's dtype below anyway;
                // its product in bf16 (fp32 accumulation inside the GEMM) costs half the fp32
                // one. bf16 keeps fp32's exponent range, so small entries of `g` do not vanish
                // (f16 would flush them; it keeps the fp32 products).
                None => {
                    let g16 = g.to_kind(Kind::BFloat16);
                    // One bf16 GEMM adding into the fp32 gradient, fp32 accumulation inside (GPU:
                    // tensor cores; CPU: MKL, 2-3x the fp32 product's rate at 85 rows a chunk).
                    if !(bf16_head_gemm_into_fp32 && addmm_bf16_into_f32(&head_grad, &g16.tr(), &hd)) {
                        let _ = head_grad.shallow_clone().addmm_(&g.to_kind(Kind::Float).tr(), &hd.to_kind(Kind::Float));
                    }
                    g16.matmul(head) // [len, hidden]
                }
                Some(head_f32) => {
                    let _ = head_grad.shallow_clone().addmm_(&g.tr(), &hd.to_kind(Kind::Float));
                    g.matmul(head_f32)
                }
            }
        });
        // Hand the hidden gradient to autograd: d/dx sum(x * g) = g.
        (&h * grad_h.to_kind(h.kind())).sum(Kind::Float).backward();
    }
    if !in_place {
        add_to_grad(head_param, &head_grad);
    }
    let sums = Tensor::stack(&[ce_sum, kd_sum], 0).to_device(Device::Cpu);
    let sums = Vec::<f64>::try_from(sums).expect("two f64 loss sums");
    LogitLossSums { ce: sums[0] + swept.ce, kd: if matches!(teacher, TeacherRows::None) { 0.0 } else { sums[1] + swept.kd } }
}

/// The per-token reverse KL estimated from the sampled token, for on-policy batches whose
/// teacher gives only the log-probability of the tokens the student sampled (a served teacher's
/// top-K need not hold them; the estimate needs nothing else). For a completion token `y`
/// sampled from the student `q` after its prefix, `log q(y) - log p(y)` is an unbiased estimate
/// of KL(q || p) at that position, and `sg(log q(y) - log p(y)) * grad log q(y)` an unbiased
/// estimate of its gradient (the score-function identity: `E_q[grad log q] = 0`), as in
/// on-policy distillation with a per-token reward and no discounting of later tokens (Thinking
/// Machines, 2025; TRL's server-side GKD). Its bias: it is exact only for tokens sampled at
/// temperature 1 without top-p (otherwise the samples are not from `q`); it ignores the effect
/// of a token on the later positions' KL (the sequence-level reverse KL's policy gradient); a
/// single sample is noisy. Targets whose `teacher_lp` is NaN are left out. Returns the sum of the estimates; with `backward`, each chunk's
/// `weight * sum(sg(estimate) * log q(y))` is back-propagated into `hidden.grad()` and the head.
pub fn chunked_sampled_reverse_kl(student: &CausalLm, hidden: &Tensor, targets: &Tensor, teacher_lp: &Tensor, chunk: i64, weight: f64, backward: bool) -> f64 {
    let chunk = chunk_rows(chunk, student.config.vocab_size, hidden.device());
    let mut sum = 0.0;
    for (start, len) in row_chunks(hidden.size()[0], chunk) {
        let logits = student.logits(&hidden.narrow(0, start, len)).to_kind(Kind::Float);
        let tgt = targets.narrow(0, start, len);
        // A target without a teacher log-probability (NaN) is left out.
        let t_lp = teacher_lp.narrow(0, start, len).to_kind(Kind::Float);
        let valid = tgt.ge(0).logical_and(&t_lp.isfinite()).to_kind(Kind::Float);
        let s_lp = logits.log_softmax(-1, Kind::Float).gather(1, &tgt.clamp_min(0).unsqueeze(1), false).squeeze_dim(1);
        let estimate = (s_lp.detach() - t_lp.nan_to_num(0.0, 0.0, 0.0)) * &valid;
        sum += estimate.sum(Kind::Float).double_value(&[]);
        if backward {
            ((estimate * s_lp).sum(Kind::Float) * weight).backward();
        }
    }
    sum
}

/// The teacher's log-probability of each target from its hidden states `[n, h_t]`, chunk by chunk.
pub fn teacher_target_logprobs(teacher: &CausalLm, hidden: &Tensor, targets: &Tensor, chunk: i64) -> Tensor {
    let chunk = chunk_rows(chunk, teacher.config.vocab_size, hidden.device());
    tch::no_grad(|| {
        let parts: Vec<Tensor> = row_chunks(hidden.size()[0], chunk)
            .map(|(start, len)| {
                let lp = teacher.logits(&hidden.narrow(0, start, len)).to_kind(Kind::Float).log_softmax(-1, Kind::Float);
                lp.gather(1, &targets.narrow(0, start, len).clamp_min(0).unsqueeze(1), false).squeeze_dim(1)
            })
            .collect();
        Tensor::cat(&parts, 0)
    })
}

/// [`chunked_logit_losses`] through autograd, for every divergence and offline logits.
pub fn chunked_logit_losses_autograd(
    student: &CausalLm,
    hidden: &Tensor,
    targets: &Tensor,
    teacher: &TeacherRows,
    w: &LogitLossWeights,
    normalizer: f64,
    backward: bool,
) -> LogitLossSums {
    let chunk = chunk_rows(w.chunk, student.config.vocab_size, hidden.device());
    let mut sums = LogitLossSums::default();
    for (start, len) in row_chunks(hidden.size()[0], chunk) {
        let logits = student.logits(&hidden.narrow(0, start, len)).to_kind(Kind::Float);
        let tgt = targets.narrow(0, start, len);
        let ce = logits.cross_entropy_loss::<Tensor>(&tgt, None, tch::Reduction::Sum, -100, 0.0);
        let kd = match teacher {
            TeacherRows::Online { model, hidden: ht } => {
                let tl = tch::no_grad(|| model.logits(&ht.narrow(0, start, len)).to_kind(Kind::Float));
                Some(kd_dense(&logits, &tl, w.temperature, w.divergence).sum(Kind::Float))
            }
            TeacherRows::Offline(sparse) => {
                Some(kd_sparse(&logits, &sparse.narrow(start, len), w.temperature, w.divergence).sum(Kind::Float))
            }
            TeacherRows::None => None,
        };
        sums.ce += ce.double_value(&[]);
        let mut loss = &ce * (w.alpha / normalizer);
        if let Some(kd) = kd {
            sums.kd += kd.double_value(&[]);
            loss = loss + kd * (w.beta / normalizer);
        }
        if backward {
            loss.backward();
        }
    }
    sums
}
