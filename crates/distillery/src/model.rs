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
use crate::config::{Activation, Arch, ModelConfig};
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

    fn conv1d(p: nn::Path, in_dim: i64, out_dim: i64, std: f64) -> Linear {
        Linear {
            weight: p.var("weight", &[in_dim, out_dim], Init::Randn { mean: 0.0, stdev: std }),
            bias: Some(p.var("bias", &[out_dim], Init::Const(0.0))),
            conv1d: true,
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
            x.linear(&self.weight, self.bias.as_ref())
        }
    }
}

#[derive(Debug)]
enum Norm {
    Rms { weight: Tensor, eps: f64 },
    Layer { weight: Tensor, bias: Tensor, eps: f64 },
}

/// RMSNorm computed in fp32 and cast back, as `LlamaRMSNorm` does.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    let kind = x.kind();
    let x32 = x.to_kind(Kind::Float);
    let var = x32.square().mean_dim(-1, true, Kind::Float);
    (x32 * (var + eps).rsqrt()).to_kind(kind) * weight
}

impl Norm {
    fn new(p: nn::Path, dim: i64, cfg: &ModelConfig) -> Norm {
        if cfg.arch == Arch::Gpt2 {
            Norm::Layer {
                weight: p.var("weight", &[dim], Init::Const(1.0)),
                bias: p.var("bias", &[dim], Init::Const(0.0)),
                eps: cfg.norm_eps,
            }
        } else {
            Norm::Rms { weight: p.var("weight", &[dim], Init::Const(1.0)), eps: cfg.norm_eps }
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

fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size().last().copied().unwrap() / 2;
    let x1 = x.narrow(-1, 0, half);
    let x2 = x.narrow(-1, half, half);
    Tensor::cat(&[x2.neg(), x1], -1)
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
        let h = cfg.hidden_size;
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        if cfg.arch == Arch::Gpt2 {
            return Attention {
                qkv: Qkv::Fused(Linear::conv1d(&p / "c_attn", h, 3 * h, std)),
                o: Linear::conv1d(&p / "c_proj", h, h, std),
                q_norm: None,
                k_norm: None,
                num_heads: nh,
                num_kv_heads: nkv,
                head_dim: hd,
                norm_eps: cfg.norm_eps,
            };
        }
        Attention {
            qkv: Qkv::Separate {
                q: Linear::new(&p / "q_proj", h, nh * hd, cfg.qkv_bias, std),
                k: Linear::new(&p / "k_proj", h, nkv * hd, cfg.qkv_bias, std),
                v: Linear::new(&p / "v_proj", h, nkv * hd, cfg.qkv_bias, std),
            },
            o: Linear::new(&p / "o_proj", nh * hd, h, cfg.o_bias, std),
            q_norm: cfg.qk_norm.then(|| (&p / "q_norm").var("weight", &[hd], Init::Const(1.0))),
            k_norm: cfg.qk_norm.then(|| (&p / "k_norm").var("weight", &[hd], Init::Const(1.0))),
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
            norm_eps: cfg.norm_eps,
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
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        want_probs: bool,
        head_norms: Option<&mut Tensor>,
    ) -> (Tensor, Option<Tensor>) {
        let (b, t, _) = x.size3().unwrap();
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let (q, k, v) = match &self.qkv {
            Qkv::Separate { q, k, v } => (q.forward(x), k.forward(x), v.forward(x)),
            Qkv::Fused(lin) => {
                let parts = lin.forward(x).split(nh * hd, -1);
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
            let (cos, sin) = (cos.unsqueeze(1), sin.unsqueeze(1));
            q = &q * &cos + rotate_half(&q) * &sin;
            k = &k * &cos + rotate_half(&k) * &sin;
        }
        let (k, v) = match cache {
            Some(slot) => {
                let (k, v) = match slot.take() {
                    Some((pk, pv)) => (Tensor::cat(&[pk, k], 2), Tensor::cat(&[pv, v], 2)),
                    None => (k, v),
                };
                *slot = Some((k.shallow_clone(), v.shallow_clone()));
                (k, v)
            }
            None => (k, v),
        };
        let groups = nh / nkv;
        let (k, v) = (repeat_kv(&k, groups), repeat_kv(&v, groups));
        let scale = 1.0 / (hd as f64).sqrt();
        let (out, probs) = if want_probs {
            // Eager path, as transformers' `eager_attention_forward`: softmax in fp32.
            let mut scores = q.matmul(&k.transpose(-2, -1)) * scale;
            scores = match mask {
                AttnMask::Causal => {
                    let s = k.size()[2];
                    let causal = Tensor::ones([t, s], (Kind::Bool, x.device())).tril(s - t);
                    scores.masked_fill(&causal.logical_not(), f64::from(f32::MIN))
                }
                AttnMask::Additive(m) => scores + m,
            };
            let probs = scores.softmax(-1, Kind::Float).to_kind(q.kind());
            (probs.matmul(&v), Some(probs))
        } else {
            let out = match mask {
                AttnMask::Causal => Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, true, scale, false),
                AttnMask::Additive(m) => Tensor::scaled_dot_product_attention(&q, &k, &v, Some(m), 0.0, false, scale, false),
            };
            (out, None)
        };
        if let Some(acc) = head_norms {
            // Per-head output norm summed over tokens: [nh] (Minitron head importance).
            *acc += out.to_kind(Kind::Float).norm_scalaropt_dim(2.0, [-1], false).sum_dim_intlist([0i64, 2].as_slice(), false, Kind::Float);
        }
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

impl Mlp {
    fn new(p: nn::Path, cfg: &ModelConfig, std: f64) -> Mlp {
        let (h, f) = (cfg.hidden_size, cfg.intermediate_size);
        if cfg.arch == Arch::Gpt2 {
            Mlp::Plain {
                fc: Linear::conv1d(&p / "c_fc", h, f, std),
                proj: Linear::conv1d(&p / "c_proj", f, h, std),
                act: cfg.activation,
            }
        } else {
            Mlp::Gated {
                gate: Linear::new(&p / "gate_proj", h, f, cfg.mlp_bias, std),
                up: Linear::new(&p / "up_proj", h, f, cfg.mlp_bias, std),
                down: Linear::new(&p / "down_proj", f, h, cfg.mlp_bias, std),
                act: cfg.activation,
            }
        }
    }

    /// The output, and when `inner` is given, adds to it the summed `|activation|` of every
    /// intermediate channel (Minitron FFN importance).
    fn forward(&self, x: &Tensor, inner: Option<&mut Tensor>) -> Tensor {
        let Some(acc) = inner else { return self.forward_plain(x) };
        let (mid, out_proj) = match self {
            Mlp::Gated { gate, up, down, act } => (activate(&gate.forward(x), *act) * up.forward(x), down),
            Mlp::Plain { fc, proj, act } => (activate(&fc.forward(x), *act), proj),
        };
        *acc += mid.to_kind(Kind::Float).abs().sum_dim_intlist([0i64, 1].as_slice(), false, Kind::Float);
        out_proj.forward(&mid)
    }

    fn forward_plain(&self, x: &Tensor) -> Tensor {
        match self {
            Mlp::Gated { gate, up, down, act } => down.forward(&(activate(&gate.forward(x), *act) * up.forward(x))),
            Mlp::Plain { fc, proj, act } => proj.forward(&activate(&fc.forward(x), *act)),
        }
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
        let h = cfg.hidden_size;
        if cfg.arch == Arch::Gpt2 {
            Block {
                norm_attn: Norm::new(&p / "ln_1", h, cfg),
                attn: Attention::new(&p / "attn", cfg, std),
                norm_mlp: Norm::new(&p / "ln_2", h, cfg),
                mlp: Mlp::new(&p / "mlp", cfg, std),
            }
        } else {
            Block {
                norm_attn: Norm::new(&p / "input_layernorm", h, cfg),
                attn: Attention::new(&p / "self_attn", cfg, std),
                norm_mlp: Norm::new(&p / "post_attention_layernorm", h, cfg),
                mlp: Mlp::new(&p / "mlp", cfg, std),
            }
        }
    }
}

/// Per-layer keys and values of the positions seen so far (`[b, kv_heads, len, hd]` each).
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> KvCache {
        KvCache { layers: (0..num_layers).map(|_| None).collect() }
    }

    /// Number of positions cached.
    pub fn len(&self) -> i64 {
        self.layers.first().and_then(|l| l.as_ref()).map_or(0, |(k, _)| k.size()[2])
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
    pub attentions: bool,
    /// Activation statistics for structured pruning ([`LayerImportance`]); use unpadded batches.
    pub importance: bool,
}

/// Activation statistics of one layer, summed over the tokens seen (Minitron-style importance).
pub struct LayerImportance {
    /// `[heads]`: L2 norm of each head's attention output.
    pub heads: Tensor,
    /// `[intermediate]`: |activation| of each FFN channel.
    pub ffn: Tensor,
    /// `[hidden]`: |output| of this layer's two norms, per hidden channel.
    pub hidden: Tensor,
    /// Sum over tokens of `1 - cos(layer input, layer output)` (ShortGPT block influence).
    pub block_influence: f64,
    pub tokens: i64,
}

pub struct ForwardOutput {
    /// Final hidden states after the last norm: `[b, t, hidden]`.
    pub hidden: Tensor,
    /// `[embeddings, layer 1 output, ..., layer L output]` (before the final norm), each `[b, t, hidden]`.
    pub hidden_states: Vec<Tensor>,
    /// One `[b, heads, t, kv_len]` probability tensor per layer.
    pub attentions: Vec<Tensor>,
    /// Per-layer activation statistics, when captured.
    pub importance: Vec<LayerImportance>,
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
    let d = cfg.head_dim as f64;
    let base: Vec<f64> =
        (0..cfg.head_dim / 2).map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f64 / d)).collect();
    let Some(s) = &cfg.rope_llama3 else { return base };
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
        let (base, layer_prefix, final_norm_name) = match cfg.arch {
            Arch::Gpt2 => (&root / "transformer", "h", "ln_f"),
            _ => (&root / "model", "layers", "norm"),
        };
        let embed_name = if cfg.arch == Arch::Gpt2 { "wte" } else { "embed_tokens" };
        let embed = (&base / embed_name).var("weight", &[cfg.vocab_size, cfg.hidden_size], randn);
        let pos_embed = (cfg.arch == Arch::Gpt2)
            .then(|| (&base / "wpe").var("weight", &[cfg.max_position_embeddings, cfg.hidden_size], randn));
        let layers = (0..cfg.num_layers).map(|i| Block::new(&base / layer_prefix / i, cfg, std)).collect();
        let final_norm = Norm::new(&base / final_norm_name, cfg.hidden_size, cfg);
        let lm_head = (!cfg.tie_word_embeddings)
            .then(|| (&root / "lm_head").var("weight", &[cfg.vocab_size, cfg.hidden_size], randn));
        let inv_freq = (cfg.arch != Arch::Gpt2).then(|| {
            Tensor::from_slice(&rope_inv_freq(cfg)).to_kind(Kind::Float).to_device(device)
        });
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

    pub fn param_count(&self) -> i64 {
        self.vs.trainable_variables().iter().map(|t| t.numel() as i64).sum()
    }

    /// Full forward pass without cache, returning logits `[b, t, vocab]`.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Tensor {
        let out = self.forward_hidden(input_ids, attention_mask, Capture::default(), None);
        self.logits(&out.hidden)
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
    pub fn forward_hidden(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        capture: Capture,
        mut cache: Option<&mut KvCache>,
    ) -> ForwardOutput {
        let device = self.device();
        let (b, t) = input_ids.size2().unwrap();
        let past = cache.as_ref().map_or(0, |c| c.len());
        let total = past + t;
        let key_mask = match attention_mask {
            Some(m) => {
                assert_eq!(m.size(), [b, total], "attention_mask must be [batch, past + new]");
                Some(m.to_device(device).to_kind(Kind::Int64))
            }
            None => None,
        };
        let positions = match &key_mask {
            Some(m) => (m.cumsum(-1, Kind::Int64) - 1).clamp_min(0).narrow(1, past, t),
            None => Tensor::arange_start(past, total, (Kind::Int64, device)).unsqueeze(0).expand([b, t], false),
        };
        let padded = key_mask.as_ref().is_some_and(|m| m.min().int64_value(&[]) == 0);
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

        let mut hidden_states = vec![];
        let mut attentions = vec![];
        let mut importance = vec![];
        if capture.hidden_states {
            hidden_states.push(x.shallow_clone());
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let mut stats = capture.importance.then(|| {
                let zeros = |n: i64| Tensor::zeros([n], (Kind::Float, device));
                LayerImportance {
                    heads: zeros(self.config.num_heads),
                    ffn: zeros(self.config.intermediate_size),
                    hidden: zeros(self.config.hidden_size),
                    block_influence: 0.0,
                    tokens: b * t,
                }
            });
            let x_in = x.shallow_clone();
            let normed = layer.norm_attn.forward(&x);
            let (a, probs) = layer.attn.forward(
                &normed,
                rope.as_ref(),
                &mask,
                slot,
                capture.attentions,
                stats.as_mut().map(|s| &mut s.heads),
            );
            x = x + a;
            let normed2 = layer.norm_mlp.forward(&x);
            x = &x + layer.mlp.forward(&normed2, stats.as_mut().map(|s| &mut s.ffn));
            if let Some(mut s) = stats {
                for n in [&normed, &normed2] {
                    s.hidden += n.to_kind(Kind::Float).abs().sum_dim_intlist([0i64, 1].as_slice(), false, Kind::Float);
                }
                let cos = Tensor::cosine_similarity(&x_in.to_kind(Kind::Float), &x.to_kind(Kind::Float), -1, 1e-8);
                s.block_influence = cos.neg().g_add_scalar(1.0).sum(Kind::Double).double_value(&[]);
                importance.push(s);
            }
            if capture.hidden_states {
                hidden_states.push(x.shallow_clone());
            }
            if let Some(p) = probs {
                attentions.push(p);
            }
        }
        ForwardOutput { hidden: self.final_norm.forward(&x), hidden_states, attentions, importance }
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
}
