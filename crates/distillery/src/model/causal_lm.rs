//! Decoder-only causal language models: Llama (incl. Llama 3 RoPE scaling), Mistral, Qwen2,
//! Qwen3 and GPT-2, in one readable implementation.
//!
//! Mirrors `transformers`' `modeling_llama.py`, `modeling_mistral.py`, `modeling_qwen2.py`,
//! `modeling_qwen3.py` and `modeling_gpt2.py`. Parameters live in a [`nn::VarStore`] under the
//! checkpoint's own names (`model.layers.3.self_attn.q_proj.weight`,
//! `transformer.h.0.attn.c_attn.weight`), so loading and saving need no renaming table.
//!
//! The forward pass returns the final hidden states at every position; [`CausalLm::logits`]
//! applies the output head. Distillation computes logits in chunks from those hidden states,
//! so full `[batch, seq, vocab]` tensors need not exist.
use crate::base::gemm;
use crate::base::device::add_to_grad;
use crate::model::row_kernels::{self, Rotation};
use crate::model::arch::{MlpNames, NormKind, Positions, QkvNames, WeightLayout};
use crate::model::config::{Activation, Llama3RopeScaling, ModelConfig};
use anyhow::{bail, ensure, Result};
use tch::nn::{self, Init};
use tch::{Device, Kind, Tensor};

/// `x @ W^T + b` for HF `nn.Linear`, or `x @ W + b` for GPT-2's `Conv1D` (weight `[in, out]`).
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    conv1d: bool,
}

impl Linear {
    fn new(p: nn::Path, in_dim: i64, out_dim: i64, bias: bool, std: f64) -> Linear {
        Linear {
            weight: p.var("weight", &[out_dim, in_dim], Init::Randn { mean: 0.0, stdev: std }),
            bias: bias.then(|| p.var("bias", &[out_dim], Init::Const(0.0))),
            conv1d: false,
        }
    }

    fn conv1d(p: nn::Path, in_dim: i64, out_dim: i64, bias: bool, std: f64) -> Linear {
        Linear {
            weight: p.var("weight", &[in_dim, out_dim], Init::Randn { mean: 0.0, stdev: std }),
            bias: bias.then(|| p.var("bias", &[out_dim], Init::Const(0.0))),
            conv1d: true,
        }
    }

    /// A projection in the architecture's weight layout.
    fn with_layout(layout: WeightLayout, p: nn::Path, in_dim: i64, out_dim: i64, bias: bool, std: f64) -> Linear {
        match layout {
            WeightLayout::Linear => Linear::new(p, in_dim, out_dim, bias, std),
            WeightLayout::Conv1d => Linear::conv1d(p, in_dim, out_dim, bias, std),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        if self.conv1d {
            let y = x.matmul(&self.weight);
            match &self.bias {
                Some(b) => y + b,
                None => y,
            }
        } else {
            // A decoding step's few rows: MKL's product, not oneDNN's (see `small_bf16_linear`).
            let step = row_kernels::in_decoding_step().then(|| gemm::small_bf16_linear(x, &self.weight, self.bias.as_ref()));
            step.flatten().unwrap_or_else(|| x.linear(&self.weight, self.bias.as_ref()))
        }
    }
}

/// Adds the gradient of an embedding lookup, `grad` `[b, t, hidden]` at the rows `ids` `[b, t]`,
/// to `table`'s gradient: in place once that exists (autograd's embedding backward would
/// build a dense `[rows, hidden]` gradient first, the size of the table), else through
/// autograd, which creates it. In bf16 or f16 the rows of a repeated token are summed in fp32
/// first and added once (`index_add_` would round after every repeat, on a GPU in an order
/// its atomics choose).
fn accumulate_rows(table: &Tensor, ids: &Tensor, grad: &Tensor) {
    if !table.requires_grad() {
        return;
    }
    let mut table_grad = table.grad();
    if table_grad.defined() && (table_grad.kind() == grad.kind() || table_grad.kind() == Kind::Float) {
        let width = grad.size().last().copied().unwrap_or(0);
        let (ids, grad) = (ids.reshape([-1]), grad.reshape([-1, width]));
        tch::no_grad(|| {
            if table_grad.kind() == Kind::Float {
                // An fp32 table (the model's own, or the fp32 master of a low-precision copy).
                let _ = table_grad.index_add_(0, &ids, &grad.to_kind(Kind::Float));
            } else {
                let (tokens, slot, _) = ids.internal_unique2(true, true, false);
                let sums = Tensor::zeros([tokens.size()[0], width], (Kind::Float, grad.device())).index_add(0, &slot, &grad.to_kind(Kind::Float));
                let _ = table_grad.index_add_(0, &tokens, &sums.to_kind(grad.kind()));
            }
        });
    } else {
        (Tensor::embedding(table, ids, -1, false, false) * grad).sum(Kind::Float).backward();
    }
}

#[derive(Debug)]
enum Norm {
    Rms { weight: Tensor, eps: f64 },
    Layer { weight: Tensor, bias: Tensor, eps: f64 },
}

/// RMSNorm computed in fp32 and cast back, as `LlamaRMSNorm` does (in one pass where nothing
/// is recorded, [`row_kernels::rms_norm`]).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    row_kernels::rms_norm(x, weight, eps).unwrap_or_else(|| rms_norm_ops(x, weight, eps))
}

/// [`rms_norm`] as libtorch operators.
pub(crate) fn rms_norm_ops(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    let kind = x.kind();
    let x32 = x.to_kind(Kind::Float);
    let var = x32.square().mean_dim(-1, true, Kind::Float);
    (x32 * (var + eps).rsqrt()).to_kind(kind) * weight
}

impl Norm {
    fn new(p: nn::Path, dim: i64, cfg: &ModelConfig) -> Norm {
        match cfg.spec().norm {
            NormKind::Layer => Norm::Layer {
                weight: p.var("weight", &[dim], Init::Const(1.0)),
                bias: p.var("bias", &[dim], Init::Const(0.0)),
                eps: cfg.norm_eps,
            },
            NormKind::Rms => Norm::Rms { weight: p.var("weight", &[dim], Init::Const(1.0)), eps: cfg.norm_eps },
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Norm::Rms { weight, eps } => rms_norm(x, weight, *eps),
            Norm::Layer { weight, bias, eps } => {
                let dim = weight.size()[0];
                x.layer_norm([dim], Some(weight), Some(bias), *eps, true)
            }
        }
    }
}

#[derive(Debug)]
enum Qkv {
    Separate { q: Linear, k: Linear, v: Linear },
    /// GPT-2's fused `c_attn`: one projection to `[q | k | v]`.
    Fused(Linear),
}

#[derive(Debug)]
struct Attention {
    qkv: Qkv,
    o: Linear,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    num_heads: i64,
    num_kv_heads: i64,
    head_dim: i64,
    norm_eps: f64,
}

/// How queries may see keys in one forward call.
pub enum AttnMask {
    /// Plain causal attention over the whole sequence, no padding, no cache.
    Causal,
    /// Additive mask `[batch, 1, q_len, kv_len]`: 0 where allowed, a large negative value
    /// elsewhere (finite, so that fully padded rows give uniform weights rather than NaN).
    Additive(Tensor),
}

/// One layer's place in a KV cache: its key/value buffers, the positions already cached, and
/// the capacity to allocate.
type CacheSlot<'a> = Option<(&'a mut Option<(Tensor, Tensor)>, i64, i64)>;

fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size().last().copied().unwrap() / 2;
    let x1 = x.narrow(-1, 0, half);
    let x2 = x.narrow(-1, half, half);
    Tensor::cat(&[x2.neg(), x1], -1)
}

/// Rotary position embedding of `x` `[b, heads, t, hd]` by the tables `cos`, `sin` `[b, t,
/// hd]` (in one pass where nothing is recorded, [`row_kernels::rotary`]).
fn rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    row_kernels::rotary(x, cos, sin, Rotation::Forward).unwrap_or_else(|| rotary_ops(x, cos, sin))
}

/// [`rotary`] as libtorch operators, as transformers' `apply_rotary_pos_emb`.
pub(crate) fn rotary_ops(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let (cos, sin) = (cos.unsqueeze(1), sin.unsqueeze(1));
    x * &cos + rotate_half(x) * &sin
}

/// Repeats each key/value head `groups` times: `[b, kv, s, d] -> [b, kv*groups, s, d]`.
fn repeat_kv(x: &Tensor, groups: i64) -> Tensor {
    if groups == 1 {
        return x.shallow_clone();
    }
    let (b, kv, s, d) = x.size4().unwrap();
    x.unsqueeze(2).expand([b, kv, groups, s, d], false).reshape([b, kv * groups, s, d])
}

impl Attention {
    fn new(p: nn::Path, cfg: &ModelConfig, std: f64) -> Attention {
        let spec = cfg.spec();
        let h = cfg.hidden_size;
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let lin = |name: &str, i: i64, o: i64, bias: bool| Linear::with_layout(spec.layout, &p / name, i, o, bias, std);
        let qkv = match spec.qkv {
            QkvNames::Separate { q, k, v } => Qkv::Separate {
                q: lin(q, h, nh * hd, cfg.qkv_bias),
                k: lin(k, h, nkv * hd, cfg.qkv_bias),
                v: lin(v, h, nkv * hd, cfg.qkv_bias),
            },
            QkvNames::Fused(name) => Qkv::Fused(lin(name, h, (nh + 2 * nkv) * hd, cfg.qkv_bias)),
        };
        let norm = |name: &str| (&p / name).var("weight", &[hd], Init::Const(1.0));
        Attention {
            qkv,
            o: lin(spec.o_proj, nh * hd, h, cfg.o_bias),
            q_norm: spec.qk_norm.map(|(q, _)| norm(q)),
            k_norm: spec.qk_norm.map(|(_, k)| norm(k)),
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
            norm_eps: cfg.norm_eps,
        }
    }

    /// The queries, keys and values of `x` `[b, t, hidden]`: `[b, heads, t, hd]` (keys and values
    /// with the key/value heads), q/k-normed where the architecture does, rotated where it has
    /// rotary positions. Their memory is `[b, t, heads, hd]`, so SDPA's output is too and its
    /// transpose back to `[b, t, hidden]` costs no copy.
    fn project(&self, x: &Tensor, rope: Option<&(Tensor, Tensor)>) -> (Tensor, Tensor, Tensor) {
        let (b, t, _) = x.size3().unwrap();
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let (q, k, v) = match &self.qkv {
            Qkv::Separate { q, k, v } => (q.forward(x), k.forward(x), v.forward(x)),
            Qkv::Fused(lin) => {
                let parts = lin.forward(x).split_with_sizes([nh * hd, nkv * hd, nkv * hd], -1);
                (parts[0].shallow_clone(), parts[1].shallow_clone(), parts[2].shallow_clone())
            }
        };
        // [b, t, heads, hd]
        let mut q = q.view([b, t, nh, hd]);
        let mut k = k.view([b, t, nkv, hd]);
        let v = v.view([b, t, nkv, hd]).transpose(1, 2);
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = rms_norm(&q, qn, self.norm_eps);
            k = rms_norm(&k, kn, self.norm_eps);
        }
        // [b, heads, t, hd]
        let mut q = q.transpose(1, 2);
        let mut k = k.transpose(1, 2);
        if let Some((cos, sin)) = rope {
            q = rotary(&q, cos, sin);
            k = rotary(&k, cos, sin);
        }
        (q, k, v)
    }

    /// Scaled dot-product attention `[b, heads, t, hd]` of the projected q, k, v, the key/value
    /// heads grouped inside SDPA (`enable_gqa`): no repeated keys and values in memory.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttnMask) -> Tensor {
        let gqa = self.num_heads > self.num_kv_heads;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        match mask {
            AttnMask::Causal => Tensor::scaled_dot_product_attention(q, k, v, None::<Tensor>, 0.0, true, scale, gqa),
            AttnMask::Additive(m) => Tensor::scaled_dot_product_attention(q, k, v, Some(m), 0.0, false, scale, gqa),
        }
    }

    /// # Shapes
    /// `x`: `[b, t, hidden]`; `rope`: `(cos, sin)` each `[b, t, head_dim]`.
    /// Returns the output `[b, t, hidden]` and, when asked, probabilities `[b, heads, t, kv_len]`.
    fn forward(
        &self,
        x: &Tensor,
        rope: Option<&(Tensor, Tensor)>,
        mask: &AttnMask,
        cache: CacheSlot<'_>,
        want_probs: bool,
        observer: &mut dyn ForwardObserver, layer: usize,
    ) -> (Tensor, Option<Tensor>) {
        let (b, t, _) = x.size3().unwrap();
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let (q, k, v) = self.project(x, rope);
        let (k, v) = match cache {
            // The new keys and values are written into preallocated buffers at `past`, so a
            // decoded token costs no copy of the whole cache (`cat` would, every step).
            Some((slot, past, capacity)) => {
                let grow = |old: Option<Tensor>, new: &Tensor| -> Tensor {
                    let size = old.as_ref().map_or(0, |o| o.size()[2]);
                    if past + t <= size {
                        return old.unwrap();
                    }
                    let cap = capacity.max(past + t).max(2 * size);
                    let buf = Tensor::zeros([b, nkv, cap, hd], (new.kind(), new.device()));
                    if let Some(o) = old {
                        buf.narrow(2, 0, past).copy_(&o.narrow(2, 0, past));
                    }
                    buf
                };
                let (kb, vb) = match slot.take() {
                    Some((kb, vb)) => (grow(Some(kb), &k), grow(Some(vb), &v)),
                    None => (grow(None, &k), grow(None, &v)),
                };
                kb.narrow(2, past, t).copy_(&k);
                vb.narrow(2, past, t).copy_(&v);
                let view = (kb.narrow(2, 0, past + t), vb.narrow(2, 0, past + t));
                *slot = Some((kb, vb));
                view
            }
            None => (k, v),
        };
        let groups = nh / nkv;
        let scale = 1.0 / (hd as f64).sqrt();
        let (out, probs) = if want_probs {
            let (k, v) = (repeat_kv(&k, groups), repeat_kv(&v, groups));
            // Eager path, as transformers' `eager_attention_forward`: softmax in fp32. The scores
            // are masked in fp32 too, so the fill value fits whatever the model's dtype (f32::MIN
            // overflows bf16 and f16).
            let mut scores = (q.matmul(&k.transpose(-2, -1)) * scale).to_kind(Kind::Float);
            scores = match mask {
                AttnMask::Causal => {
                    let s = k.size()[2];
                    let causal = Tensor::ones([t, s], (Kind::Bool, x.device())).tril(s - t);
                    scores.masked_fill(&causal.logical_not(), f64::from(f32::MIN))
                }
                AttnMask::Additive(m) => scores + m.to_kind(Kind::Float),
            };
            let probs = scores.softmax(-1, Kind::Float).to_kind(q.kind());
            (probs.matmul(&v), Some(probs))
        } else {
            (self.attend(&q, &k, &v, mask), None)
        };
        observer.attention_heads(layer, &out);
        let out = out.transpose(1, 2).reshape([b, t, nh * hd]);
        (self.o.forward(&out), probs)
    }
}

#[derive(Debug)]
enum Mlp {
    /// `down(act(gate(x)) * up(x))`
    Gated { gate: Linear, up: Linear, down: Linear, act: Activation },
    /// GPT-2: `c_proj(act(c_fc(x)))`
    Plain { fc: Linear, proj: Linear, act: Activation },
}

fn activate(x: &Tensor, act: Activation) -> Tensor {
    match act {
        Activation::Silu => x.silu(),
        Activation::GeluTanh => x.gelu("tanh"),
        Activation::Gelu => x.gelu("none"),
        Activation::Relu => x.relu(),
    }
}

/// `act(gate) * up`: one pass for SiLU where [`row_kernels::silu_mul`] applies.
fn gated(gate: &Tensor, up: &Tensor, act: Activation) -> Tensor {
    let fused = (act == Activation::Silu).then(|| row_kernels::silu_mul(gate, up)).flatten();
    fused.unwrap_or_else(|| activate(gate, act) * up)
}

impl Mlp {
    fn new(p: nn::Path, cfg: &ModelConfig, std: f64) -> Mlp {
        let spec = cfg.spec();
        let (h, f) = (cfg.hidden_size, cfg.intermediate_size);
        let lin = |name: &str, i: i64, o: i64| Linear::with_layout(spec.layout, &p / name, i, o, cfg.mlp_bias, std);
        match spec.mlp {
            MlpNames::Plain { fc, proj } => Mlp::Plain { fc: lin(fc, h, f), proj: lin(proj, f, h), act: cfg.activation },
            MlpNames::Gated { gate, up, down } => {
                Mlp::Gated { gate: lin(gate, h, f), up: lin(up, h, f), down: lin(down, f, h), act: cfg.activation }
            }
        }
    }

    /// The output; an observer sees the intermediate activations `[b, t, intermediate]`.
    fn forward(&self, x: &Tensor, observer: &mut dyn ForwardObserver, layer: usize) -> Tensor {
        let (mid, out_proj) = match self {
            Mlp::Gated { gate, up, down, act } => (gated(&gate.forward(x), &up.forward(x), *act), down),
            Mlp::Plain { fc, proj, act } => (activate(&fc.forward(x), *act), proj),
        };
        observer.ffn_inner(layer, &mid);
        out_proj.forward(&mid)
    }
}

#[derive(Debug)]
struct Block {
    norm_attn: Norm,
    attn: Attention,
    norm_mlp: Norm,
    mlp: Mlp,
}

impl Block {
    fn new(p: nn::Path, cfg: &ModelConfig, std: f64) -> Block {
        let spec = cfg.spec();
        let h = cfg.hidden_size;
        Block {
            norm_attn: Norm::new(&p / spec.norm_attn, h, cfg),
            attn: Attention::new(&p / spec.attn, cfg, std),
            norm_mlp: Norm::new(&p / spec.norm_mlp, h, cfg),
            mlp: Mlp::new(&p / "mlp", cfg, std),
        }
    }

    /// The layer's output `[b, t, hidden]` and, when asked, its attention probabilities.
    fn forward(&self, x: &Tensor, ctx: &LayerInputs, slot: CacheSlot<'_>, want_probs: bool, observer: &mut dyn ForwardObserver, layer: usize) -> (Tensor, Option<Tensor>) {
        let normed = self.norm_attn.forward(x);
        let (a, probs) = self.attn.forward(&normed, ctx.rope.as_ref(), &ctx.mask, slot, want_probs, observer, layer);
        let mid = x + a;
        let normed2 = self.norm_mlp.forward(&mid);
        let out = &mid + self.mlp.forward(&normed2, observer, layer);
        observer.layer(layer, x, [&normed, &normed2], &out);
        (out, probs)
    }
}

/// What a layer run by [`Block::forward_lean`] keeps for its backward pass: the attention's
/// queries, keys and values (leaves) with SDPA's output and graph, the attention block's output
/// `mid` (the input of the second norm), and the MLP's gate and up projections. Everything else
/// a plain autograd pass would save (the norms' intermediates and outputs, the activation, its
/// product with `up`) is recomputed from these by elementwise work, about half the layer's
/// saved memory (6.9 hidden-sized tensors a token instead of 13.6 for SmolLM2's shapes).
pub(crate) struct LeanSaved {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn: Tensor,
    mid: Tensor,
    gate: Tensor,
    up: Tensor,
}

/// `grad` `[rows, out]` of `lin`'s output at `input` `[rows, in]`: adds the weight's (and bias')
/// gradients into their `.grad` (a GEMM accumulating in place where one exists, as autograd
/// would add its product) and returns the input's gradient `[rows, in]`.
fn linear_backward(lin: &Linear, input: &Tensor, grad: &Tensor) -> Tensor {
    debug_assert!(!lin.conv1d, "the lean path takes nn.Linear layouts only");
    let mut wg = lin.weight.grad();
    if wg.defined() && wg.kind() == grad.kind() && wg.is_contiguous() {
        tch::no_grad(|| {
            let _ = wg.addmm_(&grad.tr(), input);
        });
    } else {
        // (No gradient yet: autograd creates it.)
        add_to_grad(&lin.weight, &tch::no_grad(|| grad.tr().mm(input)));
    }
    if let Some(bias) = &lin.bias {
        add_to_grad(bias, &tch::no_grad(|| grad.sum_dim_intlist(0, false, grad.kind())));
    }
    tch::no_grad(|| grad.mm(&lin.weight))
}

/// Hands `grad` to autograd as the gradient of `out` (`d/d out sum(out * grad) = grad`
/// exactly), into the leaves `out` was computed from.
fn backward_through(out: &Tensor, grad: &Tensor) {
    (out * grad.detach()).sum(Kind::Float).backward();
}

impl Block {
    /// Whether [`Block::forward_lean`] can run this layer: RMSNorm, separate q/k/v projections
    /// without q/k norms, a gated MLP, nn.Linear weights, and no attention map to capture
    /// (Llama, Mistral and Qwen2; the others keep the plain autograd pass).
    fn lean_applies(&self, want_probs: bool) -> bool {
        let linear = |l: &Linear| !l.conv1d;
        let attn_ok = match &self.attn.qkv {
            Qkv::Separate { q, k, v } => linear(q) && linear(k) && linear(v) && linear(&self.attn.o) && self.attn.q_norm.is_none(),
            Qkv::Fused(_) => false,
        };
        let mlp_ok = matches!(&self.mlp, Mlp::Gated { gate, up, down, .. } if linear(gate) && linear(up) && linear(down));
        let norms_ok = matches!((&self.norm_attn, &self.norm_mlp), (Norm::Rms { .. }, Norm::Rms { .. }));
        !want_probs && attn_ok && mlp_ok && norms_ok
    }

    /// The layer's output for a training step, keeping only [`LeanSaved`] for
    /// [`Block::backward_lean`]: the projections run without autograd, SDPA with it (its
    /// backward needs its own saved statistics). `x` is the layer's input leaf.
    fn forward_lean(&self, x: &Tensor, ctx: &LayerInputs) -> (Tensor, LeanSaved) {
        let saved = self.lean_saved(x, ctx);
        let Mlp::Gated { down, act, .. } = &self.mlp else { unreachable!("checked by lean_applies") };
        let out = tch::no_grad(|| &saved.mid + down.forward(&gated(&saved.gate, &saved.up, *act)));
        (out, saved)
    }

    /// What [`Block::forward_lean`] keeps, without the layer's output (the MLP's down
    /// projection): all a recomputed layer's backward pass needs.
    fn lean_saved(&self, x: &Tensor, ctx: &LayerInputs) -> LeanSaved {
        let (b, t, _) = x.size3().unwrap();
        let (nh, hd) = (self.attn.num_heads, self.attn.head_dim);
        let (q, k, v) = tch::no_grad(|| self.attn.project(&self.norm_attn.forward(x), ctx.rope.as_ref()));
        let (q, k, v) = (q.set_requires_grad(true), k.set_requires_grad(true), v.set_requires_grad(true));
        let attn = self.attn.attend(&q, &k, &v, &ctx.mask);
        let Mlp::Gated { gate, up, .. } = &self.mlp else { unreachable!("checked by lean_applies") };
        let (mid, g, u) = tch::no_grad(|| {
            let mid = x + self.attn.o.forward(&attn.transpose(1, 2).reshape([b, t, nh * hd]));
            let normed = self.norm_mlp.forward(&mid);
            let (g, u) = (gate.forward(&normed), up.forward(&normed));
            (mid, g, u)
        });
        LeanSaved { q, k, v, attn, mid, gate: g, up: u }
    }

    /// The backward pass of [`Block::forward_lean`]: `grad` is the gradient of the layer's
    /// output; the parameters' gradients are accumulated and the input's returned. The
    /// projections' gradients are GEMMs on recomputed inputs (the norms' outputs and the
    /// activation's product). The elementwise parts (the norms, the activation) are one-pass
    /// kernels on the CPU ([`row_kernels`]), elsewhere autograd on small graphs rebuilt from the
    /// saved tensors; SDPA's backward is always autograd's.
    fn backward_lean(&self, x: &Tensor, grad: &Tensor, saved: LeanSaved, ctx: &LayerInputs) -> Tensor {
        let LeanSaved { q, k, v, attn, mid, gate: g, up: u } = saved;
        let Mlp::Gated { gate, up, down, act } = &self.mlp else { unreachable!("checked by lean_applies") };
        let Qkv::Separate { q: q_proj, k: k_proj, v: v_proj } = &self.attn.qkv else { unreachable!("checked by lean_applies") };
        let (b, t, h) = x.size3().unwrap();
        let (nh, nkv, hd) = (self.attn.num_heads, self.attn.num_kv_heads, self.attn.head_dim);
        let rows = |t: &Tensor| {
            let width = t.size().last().copied().unwrap();
            t.reshape([-1, width])
        };
        // (Contiguous, as the kernels read it.)
        let grad = grad.reshape([b, t, h]);
        // MLP: out = mid + down(act(g) * u), g = gate(norm(mid)), u = up(norm(mid)).
        let product = tch::no_grad(|| gated(&g, &u, *act));
        let d_product = linear_backward(down, &rows(&product), &rows(&grad)).view(product.size().as_slice());
        drop(product);
        let (dg, du) = gated_backward(&g, &u, *act, &d_product);
        drop((g, u, d_product));
        let normed_rows = rows(&tch::no_grad(|| self.norm_mlp.forward(&mid)));
        let mut d_normed = linear_backward(gate, &normed_rows, &rows(&dg));
        d_normed += linear_backward(up, &normed_rows, &rows(&du));
        drop((dg, du, normed_rows));
        // The residual: mid's gradient is the output's plus what came back through the MLP.
        let d_mid = norm_backward(&self.norm_mlp, &mid, &d_normed.view([b, t, h]), &grad);
        drop((mid, d_normed));
        // Attention: mid = x + o(sdpa(q, k, v)).
        let d_attn = linear_backward(&self.attn.o, &attn.detach().transpose(1, 2).reshape([b * t, nh * hd]), &rows(&d_mid));
        backward_through(&attn, &d_attn.view([b, t, nh, hd]).transpose(1, 2));
        drop((attn, d_attn));
        // The rotation's transpose: rotate_half^T = -rotate_half, so
        // d(x cos + rotate_half(x) sin) / dx applied to g is g cos - rotate_half(g sin).
        let unrotate = |g: Tensor| match ctx.rope.as_ref() {
            Some((cos, sin)) => row_kernels::rotary(&g, cos, sin, Rotation::Transpose).unwrap_or_else(|| {
                let (cos, sin) = (cos.unsqueeze(1), sin.unsqueeze(1));
                &g * &cos - rotate_half(&(&g * &sin))
            }),
            None => g,
        };
        let heads_rows = |g: Tensor, heads: i64| g.transpose(1, 2).reshape([b * t, heads * hd]);
        let dq = heads_rows(tch::no_grad(|| unrotate(q.grad())), nh);
        let dk = heads_rows(tch::no_grad(|| unrotate(k.grad())), nkv);
        let dv = heads_rows(v.grad(), nkv);
        drop((q, k, v));
        let x = x.detach();
        let normed_rows = rows(&tch::no_grad(|| self.norm_attn.forward(&x)));
        let mut d_normed = linear_backward(q_proj, &normed_rows, &dq);
        d_normed += linear_backward(k_proj, &normed_rows, &dk);
        d_normed += linear_backward(v_proj, &normed_rows, &dv);
        drop((dq, dk, dv, normed_rows));
        norm_backward(&self.norm_attn, &x, &d_normed.view([b, t, h]), &d_mid)
    }
}

/// The gradients of `gate` and `up` for `d_product`, the gradient of `act(gate) * up`: one
/// pass for SiLU where [`row_kernels::silu_mul_backward`] applies, else autograd on the
/// product rebuilt from the two.
fn gated_backward(gate: &Tensor, up: &Tensor, act: Activation, d_product: &Tensor) -> (Tensor, Tensor) {
    let fused = tch::no_grad(|| (act == Activation::Silu).then(|| row_kernels::silu_mul_backward(gate, up, d_product)).flatten());
    fused.unwrap_or_else(|| {
        let (g, u) = (gate.detach().set_requires_grad(true), up.detach().set_requires_grad(true));
        backward_through(&(activate(&g, act) * &u), d_product);
        (g.grad(), u.grad())
    })
}

/// The gradient of an RMSNorm's input `x` for `d_normed`, the gradient of its output, plus
/// `residual` (the gradient that reaches `x` around the norm); the weight's gradient is added
/// into its `.grad`. One pass where [`row_kernels::rms_norm_backward`] applies, else autograd on
/// the norm run again.
fn norm_backward(norm: &Norm, x: &Tensor, d_normed: &Tensor, residual: &Tensor) -> Tensor {
    let Norm::Rms { weight, eps } = norm else { unreachable!("checked by lean_applies") };
    let fused = tch::no_grad(|| row_kernels::rms_norm_backward(x, weight, d_normed, *eps, Some(residual)));
    match fused {
        Some((dx, dw)) => {
            add_to_grad(weight, &dw.to_kind(weight.kind()));
            dx
        }
        None => {
            let leaf = x.detach().set_requires_grad(true);
            backward_through(&norm.forward(&leaf), d_normed);
            tch::no_grad(|| leaf.grad() + residual)
        }
    }
}

/// What every layer of one forward call reads besides its input: rotary tables and the mask
/// (and the token ids and positions the embeddings looked up, for a checkpointed backward).
struct LayerInputs {
    rope: Option<(Tensor, Tensor)>,
    mask: AttnMask,
    input_ids: Tensor,
    positions: Tensor,
}

/// What a forward pass with activation checkpointing keeps for its backward pass
/// ([`CausalLm::forward_checkpointed`], [`CausalLm::backward_checkpointed`]): each layer's
/// input (a leaf whose gradient the later layers and any loss on it fill), the leaves of
/// captured attention maps, and for the layers not recomputed their outputs (and maps) with
/// their graphs.
pub struct Checkpointed {
    inputs: Vec<Tensor>,
    last: Tensor,
    probs: Vec<Option<Tensor>>,
    kept: Vec<Kept>,
    ctx: LayerInputs,
}

/// What a checkpointed forward pass kept of one layer for its backward pass.
enum Kept {
    /// Nothing: the layer runs again on its input.
    Recompute,
    /// The output (and attention map) with autograd's graph.
    Graph(Tensor, Option<Tensor>),
    /// The lean pass's tensors ([`Block::forward_lean`]).
    Lean(LeanSaved),
}

/// Per-layer keys and values of the positions seen so far, in buffers `[b, kv_heads,
/// capacity, hd]` allocated once (and doubled if a sequence outgrows them).
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: i64,
    capacity: i64,
}

impl KvCache {
    pub fn new(num_layers: usize) -> KvCache {
        KvCache::with_capacity(num_layers, 0)
    }

    /// A cache whose buffers hold `capacity` positions from the first write.
    pub fn with_capacity(num_layers: usize, capacity: i64) -> KvCache {
        KvCache { layers: (0..num_layers).map(|_| None).collect(), len: 0, capacity }
    }

    /// Number of positions cached.
    pub fn len(&self) -> i64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps only the batch rows in `index` (used when finished sequences leave the batch).
    pub fn select_rows(&mut self, index: &Tensor) {
        for slot in self.layers.iter_mut().flatten() {
            *slot = (slot.0.index_select(0, index), slot.1.index_select(0, index));
        }
    }
}

/// What a forward pass should return besides the final hidden states.
#[derive(Clone, Copy, Default)]
pub struct Capture {
    pub hidden_states: bool,
    /// The layers whose attention probabilities are returned (the eager path runs there only):
    /// `[b, heads, t, t]` per layer is the largest activation a forward pass can make.
    pub attentions: LayerSet,
}

/// A set of layer indices (up to 256 layers).
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct LayerSet([u128; 2]);

impl LayerSet {
    pub const MAX_LAYERS: usize = 256;

    pub fn all() -> LayerSet {
        LayerSet([u128::MAX; 2])
    }

    pub fn of(layers: impl IntoIterator<Item = usize>) -> LayerSet {
        let mut set = LayerSet::default();
        for l in layers {
            assert!(l < Self::MAX_LAYERS, "layer {l} is beyond the {} a LayerSet holds", Self::MAX_LAYERS);
            set.0[l / 128] |= 1 << (l % 128);
        }
        set
    }

    pub fn contains(&self, layer: usize) -> bool {
        layer < Self::MAX_LAYERS && self.0[layer / 128] & (1 << (layer % 128)) != 0
    }

    pub fn is_empty(&self) -> bool {
        self.0 == [0, 0]
    }
}

/// Sees intermediate activations of a forward pass (pruning statistics, probes) without the
/// forward pass knowing what they are for. Every method defaults to doing nothing.
pub trait ForwardObserver {
    /// Per-head attention output of `layer` before the output projection: `[b, heads, t, head_dim]`.
    fn attention_heads(&mut self, _layer: usize, _out: &Tensor) {}
    /// FFN intermediate activations of `layer`: `[b, t, intermediate]`.
    fn ffn_inner(&mut self, _layer: usize, _mid: &Tensor) {}
    /// A layer's input and output `[b, t, hidden]` and the outputs of its two norms.
    fn layer(&mut self, _layer: usize, _input: &Tensor, _normed: [&Tensor; 2], _output: &Tensor) {}
}

/// The observer of plain forward passes.
struct NoObserver;

impl ForwardObserver for NoObserver {}

pub struct ForwardOutput {
    /// Final hidden states after the last norm: `[b, t, hidden]`.
    pub hidden: Tensor,
    /// `[embeddings, layer 1 output, ..., layer L output]` (before the final norm), each `[b, t, hidden]`.
    pub hidden_states: Vec<Tensor>,
    /// Per layer, the `[b, heads, t, kv_len]` attention probabilities if captured.
    pub attentions: Vec<Option<Tensor>>,
}

/// Parameter initialisation when a model is built.
#[derive(Clone, Copy)]
pub enum InitMode {
    /// Normal(0, `initializer_range`) weights, zero biases, unit norms (transformers' `_init_weights`).
    Random,
    /// Cheap placeholder values, about to be overwritten by loaded weights.
    ForLoading,
}

pub struct CausalLm {
    pub config: ModelConfig,
    pub vs: nn::VarStore,
    embed: Tensor,
    pos_embed: Option<Tensor>,
    layers: Vec<Block>,
    final_norm: Norm,
    /// `None` when tied to the input embeddings.
    lm_head: Option<Tensor>,
    inv_freq: Option<Tensor>,
}

/// RoPE inverse frequencies, with Llama 3 scaling when configured (`_compute_llama3_parameters`).
fn rope_inv_freq(cfg: &ModelConfig) -> Vec<f64> {
    rope_frequencies(cfg.rope_theta, cfg.head_dim as usize, cfg.rope_llama3.as_ref())
}

/// The RoPE inverse frequencies `theta^(-2i/head_dim)`, each scaled by Llama 3's rule when
/// given: kept for short wavelengths, divided by `factor` for long ones, blended between.
/// (GGUF stores the scaling as the ratio of the two, llama.cpp's `rope_freqs`.)
pub fn rope_frequencies(theta: f64, head_dim: usize, llama3: Option<&Llama3RopeScaling>) -> Vec<f64> {
    let d = head_dim as f64;
    let base: Vec<f64> = (0..head_dim / 2).map(|i| 1.0 / theta.powf((2 * i) as f64 / d)).collect();
    let Some(s) = llama3 else { return base };
    let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
    let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
    base.into_iter()
        .map(|f| {
            let wavelen = 2.0 * std::f64::consts::PI / f;
            if wavelen < high_wavelen {
                f
            } else if wavelen > low_wavelen {
                f / s.factor
            } else {
                let smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                    / (s.high_freq_factor - s.low_freq_factor);
                (1.0 - smooth) * f / s.factor + smooth * f
            }
        })
        .collect()
}

impl CausalLm {
    /// Builds the model with parameters named as in the checkpoint, on `device` in `kind`.
    pub fn new(config: ModelConfig, device: Device, kind: Kind, init: InitMode) -> CausalLm {
        let mut vs = nn::VarStore::new(device);
        let std = match init {
            InitMode::Random => config.raw.get("initializer_range").and_then(|v| v.as_f64()).unwrap_or(0.02),
            InitMode::ForLoading => 0.0,
        };
        let cfg = &config;
        let root = vs.root();
        let randn = Init::Randn { mean: 0.0, stdev: std };
        let spec = cfg.spec();
        let base = &root / spec.body;
        let embed = (&base / spec.embed).var("weight", &[cfg.vocab_size, cfg.hidden_size], randn);
        let pos_embed = spec
            .pos_embed
            .map(|name| (&base / name).var("weight", &[cfg.max_position_embeddings, cfg.hidden_size], randn));
        let layers = (0..cfg.num_layers).map(|i| Block::new(&base / spec.layers / i, cfg, std)).collect();
        let final_norm = Norm::new(&base / spec.final_norm, cfg.hidden_size, cfg);
        let lm_head = (!cfg.tie_word_embeddings)
            .then(|| (&root / "lm_head").var("weight", &[cfg.vocab_size, cfg.hidden_size], randn));
        let inv_freq = (spec.positions == Positions::Rope)
            .then(|| Tensor::from_slice(&rope_inv_freq(cfg)).to_kind(Kind::Float).to_device(device));
        if kind != Kind::Float {
            vs.set_kind(kind);
        }
        CausalLm { config, vs, embed, pos_embed, layers, final_norm, lm_head, inv_freq }
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    pub fn kind(&self) -> Kind {
        self.embed.kind()
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Output-head weight `[vocab, hidden]` (the embeddings when tied).
    pub fn lm_head_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Logits for hidden states `[.., hidden] -> [.., vocab]`.
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        hidden.linear::<Tensor>(self.lm_head_weight(), None)
    }

    /// [`CausalLm::logits`] of `hidden` `[n, hidden]` written into `out` `[n, vocab]` (of the
    /// head's dtype), a buffer reused from chunk to chunk.
    pub fn logits_into(&self, hidden: &Tensor, out: &Tensor) {
        let _ = hidden.mm_out(out, &self.lm_head_weight().tr());
    }

    pub fn param_count(&self) -> i64 {
        self.vs.trainable_variables().iter().map(|t| t.numel() as i64).sum()
    }

    /// Refuses sequences longer than a learned position table (rotary models extrapolate).
    pub fn check_positions(&self, len: i64) -> Result<()> {
        if self.config.spec().positions == Positions::Learned && len > self.config.max_position_embeddings {
            bail!(
                "a sequence has {len} tokens, more than the model's {} positions; shorten it (--max-length, --seq-len, --max-new-tokens)",
                self.config.max_position_embeddings
            );
        }
        Ok(())
    }

    /// Full forward pass without cache, returning logits `[b, t, vocab]`.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let out = self.forward_hidden(input_ids, attention_mask, Capture::default(), None)?;
        Ok(self.logits(&out.hidden))
    }

    /// Runs the model (no grad) over `seqs` in right-padded batches of `batch` sequences and
    /// calls `f(i, states)` with sequence `i`'s final hidden states `[len_i, hidden]`.
    pub fn for_each_hidden(&self, seqs: &[Vec<i64>], batch: usize, mut f: impl FnMut(usize, &Tensor)) -> Result<()> {
        let refs: Vec<&[i64]> = seqs.iter().map(Vec::as_slice).collect();
        tch::no_grad(|| {
            for start in (0..seqs.len()).step_by(batch.max(1)) {
                let rows: Vec<usize> = (start..(start + batch.max(1)).min(seqs.len())).collect();
                let b = crate::base::batch::pad_right(&refs, &rows, 0, self.device());
                let h = self.forward_hidden(&b.input_ids, Some(&b.attention_mask), Capture::default(), None)?.hidden;
                for (r, &i) in rows.iter().enumerate() {
                    f(i, &h.get(r as i64).narrow(0, 0, seqs[i].len() as i64));
                }
            }
            Ok(())
        })
    }

    /// [`CausalLm::forward_hidden`] (no cache) with an observer of intermediate activations.
    pub fn forward_observed(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>, observer: &mut dyn ForwardObserver) -> Result<ForwardOutput> {
        self.forward_impl(input_ids, attention_mask, Capture::default(), None, observer)
    }

    /// The transformer body.
    ///
    /// # Shapes
    /// * `input_ids`: `[b, t]` (int64), the new tokens.
    /// * `attention_mask`: `[b, past + t]`, 1 for real tokens and 0 for padding (left or right);
    ///   `None` means no padding.
    ///
    /// Positions count real tokens only (`cumsum(mask) - 1`), as `generate` computes them, so
    /// left-padded batches and incremental decoding give the same results as unpadded runs.
    ///
    /// Errors, rather than panics, on what user input can cause: a token id outside the
    /// vocabulary, a sequence longer than a learned position table, a mask of the wrong shape.
    pub fn forward_hidden(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>, capture: Capture, cache: Option<&mut KvCache>) -> Result<ForwardOutput> {
        self.forward_impl(input_ids, attention_mask, capture, cache, &mut NoObserver)
    }

    fn forward_impl(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        capture: Capture,
        mut cache: Option<&mut KvCache>,
        observer: &mut dyn ForwardObserver,
    ) -> Result<ForwardOutput> {
        let past = cache.as_ref().map_or(0, |c| c.len());
        // With a cache this is a step of generation: its few rows may take the step kernels.
        let _step = cache.is_some().then(row_kernels::DecodingStep::enter);
        let (mut x, ctx) = self.embed_inputs(input_ids, attention_mask, past)?;
        let mut hidden_states = vec![];
        let mut attentions = vec![];
        if capture.hidden_states {
            hidden_states.push(x.shallow_clone());
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| (&mut c.layers[i], past, c.capacity));
            let (out, probs) = layer.forward(&x, &ctx, slot, capture.attentions.contains(i), observer, i);
            x = out;
            if capture.hidden_states {
                hidden_states.push(x.shallow_clone());
            }
            if !capture.attentions.is_empty() {
                attentions.push(probs);
            }
        }
        if let Some(c) = cache {
            c.len = past + input_ids.size()[1];
        }
        Ok(ForwardOutput { hidden: self.final_norm.forward(&x), hidden_states, attentions })
    }

    /// A training forward pass that keeps only each layer's input (activation, or gradient,
    /// checkpointing): the layers run without recording a graph, and
    /// [`CausalLm::backward_checkpointed`] runs each again, with its graph, during the backward
    /// pass. Activation memory falls from every layer's intermediates (about 30 `[b, t,
    /// hidden]`-sized tensors a layer) to one tensor a layer plus one layer's intermediates,
    /// for one more forward pass of the layers.
    ///
    /// The output's `hidden` carries a graph through the final norm; its `hidden_states` and
    /// `attentions` are leaves. Back-propagate every loss on them first (their gradients land
    /// in the leaves), then drop the output (its hidden states are the saved inputs) and call
    /// [`CausalLm::backward_checkpointed`], which carries those gradients through the layers
    /// into the parameters. (On a GPU the recomputed pass, with autograd on, may pick another
    /// attention kernel than the first, so its outputs can differ in the last bits.)
    ///
    /// Only the first `recompute` layers are recomputed (Megatron's `--recompute-num-layers`);
    /// the later ones keep what their backward pass needs, trading their activation memory for
    /// their share of the extra forward pass: Llama-style layers the lean set of
    /// [`Block::forward_lean`] (the norms and the activation recomputed, no product), the others
    /// autograd's graph. `recompute` at or above the number of layers recomputes all.
    pub fn forward_checkpointed(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>, capture: Capture, recompute: usize) -> Result<(ForwardOutput, Checkpointed)> {
        let (mut x, ctx) = tch::no_grad(|| self.embed_inputs(input_ids, attention_mask, 0))?;
        let (mut inputs, mut probs, mut kept) = (vec![], vec![], vec![]);
        for (i, layer) in self.layers.iter().enumerate() {
            let leaf = x.set_requires_grad(true);
            let want_probs = capture.attentions.contains(i);
            if i < recompute {
                let (out, p) = tch::no_grad(|| layer.forward(&leaf, &ctx, None, want_probs, &mut NoObserver, i));
                probs.push(p.map(|p| p.set_requires_grad(true)));
                kept.push(Kept::Recompute);
                x = out;
            } else if layer.lean_applies(want_probs) {
                let (out, saved) = layer.forward_lean(&leaf, &ctx);
                probs.push(None);
                kept.push(Kept::Lean(saved));
                x = out;
            } else {
                // The layer's graph stays, from its input leaf to its output and map; the next
                // layer starts from a leaf again, so the backward pass is the same for both kinds.
                let (out, p) = layer.forward(&leaf, &ctx, None, want_probs, &mut NoObserver, i);
                probs.push(p.as_ref().map(|p| p.detach().set_requires_grad(true)));
                x = out.detach();
                kept.push(Kept::Graph(out, p));
            }
            inputs.push(leaf);
        }
        let last = x.set_requires_grad(true);
        let hidden_states = if capture.hidden_states {
            inputs.iter().chain([&last]).map(Tensor::shallow_clone).collect()
        } else {
            vec![]
        };
        let attentions = if capture.attentions.is_empty() { vec![] } else { probs.iter().map(|p| p.as_ref().map(Tensor::shallow_clone)).collect() };
        let hidden = self.final_norm.forward(&last);
        Ok((ForwardOutput { hidden, hidden_states, attentions }, Checkpointed { inputs, last, probs, kept, ctx }))
    }

    /// The backward pass through the layers of [`CausalLm::forward_checkpointed`]: from the
    /// last layer down, the layer runs again on its saved input and the gradients of its output
    /// (and of its attention map, if captured) go back through it, into its parameters and its
    /// input, which is the previous layer's output; the embeddings get the first input's.
    /// Layers that no gradient reaches are not recomputed.
    ///
    /// `embedding_tables` are the token (and learned-position) tables whose gradients receive
    /// the embedded rows': this model's own when `None`. A trainer with a low-precision compute
    /// copy passes its fp32 masters' (`embedding_tables` of the master model): the rows are then
    /// summed in fp32, and no dense low-precision gradient of the whole table is made.
    pub fn backward_checkpointed(&self, saved: Checkpointed, embedding_tables: Option<(&Tensor, Option<&Tensor>)>) {
        let Checkpointed { mut inputs, last, mut probs, mut kept, ctx } = saved;
        let mut grad = last.grad();
        drop(last);
        for (i, layer) in self.layers.iter().enumerate().rev() {
            let input = inputs.pop().expect("one input per layer");
            let probs_leaf = probs.pop().flatten();
            let probs_grad = probs_leaf.as_ref().map(Tensor::grad).filter(Tensor::defined);
            let kept = match kept.pop().expect("one entry per layer") {
                // A recomputed layer the lean pass covers runs it again for its saved tensors
                // (no autograd graph of the norms and the activation, no output).
                Kept::Recompute if grad.defined() && probs_leaf.is_none() && layer.lean_applies(false) => Kept::Lean(layer.lean_saved(&input, &ctx)),
                kept => kept,
            };
            if let Kept::Lean(saved) = kept {
                if grad.defined() {
                    // The input's gradient: the layer's, plus any a loss on the input itself
                    // (hidden-state matching) left in its `.grad`.
                    let dx = layer.backward_lean(&input, &grad, saved, &ctx);
                    let own = input.grad();
                    grad = if own.defined() { tch::no_grad(|| own + dx) } else { dx };
                    continue;
                }
            } else if grad.defined() || probs_grad.is_some() {
                // A kept layer's graph, or the layer again on its input, on the same attention
                // path as the forward pass (eager where the map was captured).
                let (out, p) = match kept {
                    Kept::Graph(out, p) => (out, p),
                    _ => layer.forward(&input, &ctx, None, probs_leaf.is_some(), &mut NoObserver, i),
                };
                // d/dy sum(y * g) = g: the surrogate hands each gradient to autograd exactly.
                let mut surrogate = None;
                if grad.defined() {
                    surrogate = Some((out * &grad).sum(Kind::Float));
                }
                if let (Some(p), Some(g)) = (p, probs_grad) {
                    let s = (p * g).sum(Kind::Float);
                    surrogate = Some(match surrogate {
                        Some(t) => t + s,
                        None => s,
                    });
                }
                surrogate.expect("a gradient to carry").backward();
            }
            grad = input.grad();
        }
        if grad.defined() {
            let (embed, pos_embed) = embedding_tables.unwrap_or_else(|| self.embedding_tables());
            accumulate_rows(embed, &ctx.input_ids, &grad);
            if let Some(wpe) = pos_embed {
                accumulate_rows(wpe, &ctx.positions, &grad);
            }
        }
    }

    /// The token embedding table and, for learned positions (GPT-2), the position table.
    pub fn embedding_tables(&self) -> (&Tensor, Option<&Tensor>) {
        (&self.embed, self.pos_embed.as_ref())
    }

    /// Checks the inputs, embeds the tokens (plus learned positions) and builds what every
    /// layer reads: the rotary tables and the attention mask.
    fn embed_inputs(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>, past: i64) -> Result<(Tensor, LayerInputs)> {
        let device = self.device();
        let Ok((b, t)) = input_ids.size2() else { bail!("input ids must be [batch, tokens], got {:?}", input_ids.size()) };
        let total = past + t;
        self.check_positions(total)?;
        if past == 0 && b * t > 0 {
            let (lo, hi) = (input_ids.min().int64_value(&[]), input_ids.max().int64_value(&[]));
            ensure!(lo >= 0 && hi < self.config.vocab_size, "token id {} is outside the vocabulary (0..{})", if lo < 0 { lo } else { hi }, self.config.vocab_size);
        }
        let key_mask = match attention_mask {
            Some(m) => {
                ensure!(m.size() == [b, total], "attention_mask must be [batch, past + new] = [{b}, {total}], got {:?}", m.size());
                Some(m.to_device(device).to_kind(Kind::Int64))
            }
            None => None,
        };
        let positions = match &key_mask {
            Some(m) => (m.cumsum(-1, Kind::Int64) - 1).clamp_min(0).narrow(1, past, t),
            None => Tensor::arange_start(past, total, (Kind::Int64, device)).unsqueeze(0).expand([b, t], false),
        };
        // (Decoding steps, past > 0, take the additive mask anyway: no host sync for them.)
        let padded = past == 0 && key_mask.as_ref().is_some_and(|m| m.min().int64_value(&[]) == 0);
        let window_bites = self.config.sliding_window.is_some_and(|w| w < total);
        let mask = if past == 0 && !padded && !window_bites {
            AttnMask::Causal
        } else {
            AttnMask::Additive(self.additive_mask(key_mask.as_ref(), b, t, past))
        };

        let mut x = Tensor::embedding(&self.embed, input_ids, -1, false, false);
        if let Some(wpe) = &self.pos_embed {
            x = x + Tensor::embedding(wpe, &positions, -1, false, false);
        }
        let rope = self.inv_freq.as_ref().map(|inv| {
            // [b, t, hd/2] -> [b, t, hd]
            let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * inv;
            let emb = Tensor::cat(&[&freqs, &freqs], -1);
            (emb.cos().to_kind(x.kind()), emb.sin().to_kind(x.kind()))
        });
        Ok((x, LayerInputs { rope, mask, input_ids: input_ids.shallow_clone(), positions }))
    }

    /// `[b, 1, t, past + t]` additive mask: causal by index, padded keys hidden, and the
    /// sliding window applied where configured.
    fn additive_mask(&self, key_mask: Option<&Tensor>, b: i64, t: i64, past: i64) -> Tensor {
        let device = self.device();
        let total = past + t;
        let q_idx = Tensor::arange_start(past, total, (Kind::Int64, device)).view([t, 1]);
        let k_idx = Tensor::arange(total, (Kind::Int64, device)).view([1, total]);
        let mut allowed = k_idx.le_tensor(&q_idx); // [t, total]
        if let Some(w) = self.config.sliding_window {
            allowed = allowed.logical_and(&(&q_idx - &k_idx).lt(w));
        }
        let mut allowed = allowed.view([1, 1, t, total]);
        if let Some(m) = key_mask {
            allowed = allowed.logical_and(&m.ne(0).view([b, 1, 1, total]));
        }
        let kind = self.kind();
        let min = match kind {
            Kind::BFloat16 => -3.389_531_389_251_535_5e38,
            Kind::Half => -65504.0,
            _ => f64::from(f32::MIN),
        };
        let allowed = allowed.expand([b, 1, t, total], false);
        Tensor::zeros([b, 1, t, total], (kind, device)).masked_fill(&allowed.logical_not(), min)
    }

    /// Builds a fresh cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }

    /// A fresh cache with room for `positions` positions per sequence.
    pub fn new_cache_for(&self, positions: usize) -> KvCache {
        KvCache::with_capacity(self.layers.len(), positions as i64)
    }
}
