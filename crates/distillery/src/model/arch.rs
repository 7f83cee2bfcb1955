//! The architecture table: one [`ArchSpec`] per supported `model_type`, holding everything
//! that differs between them (parameter names, config keys, norm, fused or separate q/k/v,
//! gated or plain MLP, position encoding, bias rules). The forward pass, loading, saving and
//! pruning read the table instead of testing for an architecture, so a sixth decoder of
//! the same family is one more entry in [`ARCHS`].

/// Which of the table's entries a model is; chosen once from `model_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Gpt2,
}

/// How a projection stores its weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightLayout {
    /// `nn.Linear`: `[out, in]`, applied as `x @ W^T`.
    Linear,
    /// GPT-2's `Conv1D`: `[in, out]`, applied as `x @ W`.
    Conv1d,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormKind {
    /// RMSNorm in fp32 (`LlamaRMSNorm`), weight only.
    Rms,
    /// LayerNorm with weight and bias.
    Layer,
}

/// Names of the attention projections inside a block's attention module.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QkvNames {
    Separate { q: &'static str, k: &'static str, v: &'static str },
    /// One projection to `[q | k | v]`.
    Fused(&'static str),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MlpNames {
    /// `down(act(gate(x)) * up(x))`
    Gated { gate: &'static str, up: &'static str, down: &'static str },
    /// `proj(act(fc(x)))`
    Plain { fc: &'static str, proj: &'static str },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Positions {
    /// Rotary embeddings on queries and keys.
    Rope,
    /// A learned position table (`max_position_embeddings` rows).
    Learned,
}

/// Whether a bias (or another switch) exists: always, never, or as a config flag says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Switch {
    Always,
    Never,
    /// The boolean config key, and its value when the key is absent.
    Config(&'static str, bool),
}

/// The config.json key of each shape field (GPT-2 has its own names).
#[derive(Clone, Copy, Debug)]
pub struct ConfigKeys {
    pub hidden: &'static str,
    pub heads: &'static str,
    pub layers: &'static str,
    /// `None`: the FFN width defaults to 4x hidden when the key is absent (GPT-2's n_inner).
    pub intermediate: &'static str,
    pub kv_heads: Option<&'static str>,
    pub head_dim: Option<&'static str>,
    pub max_positions: &'static str,
    pub norm_eps: &'static str,
    pub activation: &'static str,
}

/// Everything that distinguishes one architecture from another.
#[derive(Clone, Copy, Debug)]
pub struct ArchSpec {
    pub arch: Arch,
    pub model_type: &'static str,
    /// The `architectures` entry transformers uses to pick the causal-LM class.
    pub hf_class: &'static str,
    pub keys: ConfigKeys,
    pub default_activation: &'static str,
    pub default_norm_eps: f64,
    pub default_tied: bool,
    /// Prefix of the transformer body (`model`, `transformer`).
    pub body: &'static str,
    pub embed: &'static str,
    pub pos_embed: Option<&'static str>,
    pub layers: &'static str,
    pub final_norm: &'static str,
    pub norm: NormKind,
    pub norm_attn: &'static str,
    pub norm_mlp: &'static str,
    pub attn: &'static str,
    pub qkv: QkvNames,
    pub o_proj: &'static str,
    pub mlp: MlpNames,
    pub layout: WeightLayout,
    pub positions: Positions,
    pub qkv_bias: Switch,
    pub o_bias: Switch,
    pub mlp_bias: Switch,
    /// Per-head RMSNorm of queries and keys before RoPE (Qwen3), with the module names.
    pub qk_norm: Option<(&'static str, &'static str)>,
    /// Whether `sliding_window` in the config is honoured.
    pub sliding_window: Switch,
    /// Checkpoint entries that are buffers, not parameters (ignored on load).
    pub buffers: &'static [&'static str],
}

const LLAMA_KEYS: ConfigKeys = ConfigKeys {
    hidden: "hidden_size",
    heads: "num_attention_heads",
    layers: "num_hidden_layers",
    intermediate: "intermediate_size",
    kv_heads: Some("num_key_value_heads"),
    head_dim: Some("head_dim"),
    max_positions: "max_position_embeddings",
    norm_eps: "rms_norm_eps",
    activation: "hidden_act",
};

const LLAMA: ArchSpec = ArchSpec {
    arch: Arch::Llama,
    model_type: "llama",
    hf_class: "LlamaForCausalLM",
    keys: LLAMA_KEYS,
    default_activation: "silu",
    default_norm_eps: 1e-6,
    default_tied: false,
    body: "model",
    embed: "embed_tokens",
    pos_embed: None,
    layers: "layers",
    final_norm: "norm",
    norm: NormKind::Rms,
    norm_attn: "input_layernorm",
    norm_mlp: "post_attention_layernorm",
    attn: "self_attn",
    qkv: QkvNames::Separate { q: "q_proj", k: "k_proj", v: "v_proj" },
    o_proj: "o_proj",
    mlp: MlpNames::Gated { gate: "gate_proj", up: "up_proj", down: "down_proj" },
    layout: WeightLayout::Linear,
    positions: Positions::Rope,
    qkv_bias: Switch::Config("attention_bias", false),
    o_bias: Switch::Config("attention_bias", false),
    mlp_bias: Switch::Config("mlp_bias", false),
    qk_norm: None,
    sliding_window: Switch::Never,
    buffers: &["rotary_emb.inv_freq"],
};

/// Every supported architecture. Mistral, Qwen2 and Qwen3 are Llama with other switches.
pub const ARCHS: &[ArchSpec] = &[
    LLAMA,
    ArchSpec {
        arch: Arch::Mistral,
        model_type: "mistral",
        hf_class: "MistralForCausalLM",
        qkv_bias: Switch::Never,
        o_bias: Switch::Never,
        mlp_bias: Switch::Never,
        sliding_window: Switch::Always,
        ..LLAMA
    },
    ArchSpec {
        arch: Arch::Qwen2,
        model_type: "qwen2",
        hf_class: "Qwen2ForCausalLM",
        qkv_bias: Switch::Always,
        o_bias: Switch::Never,
        mlp_bias: Switch::Never,
        sliding_window: Switch::Config("use_sliding_window", false),
        ..LLAMA
    },
    ArchSpec {
        arch: Arch::Qwen3,
        model_type: "qwen3",
        hf_class: "Qwen3ForCausalLM",
        mlp_bias: Switch::Never,
        qk_norm: Some(("q_norm", "k_norm")),
        sliding_window: Switch::Config("use_sliding_window", false),
        ..LLAMA
    },
    ArchSpec {
        arch: Arch::Gpt2,
        model_type: "gpt2",
        hf_class: "GPT2LMHeadModel",
        keys: ConfigKeys {
            hidden: "n_embd",
            heads: "n_head",
            layers: "n_layer",
            intermediate: "n_inner",
            kv_heads: None,
            head_dim: None,
            max_positions: "n_positions",
            norm_eps: "layer_norm_epsilon",
            activation: "activation_function",
        },
        default_activation: "gelu_new",
        default_norm_eps: 1e-5,
        default_tied: true,
        body: "transformer",
        embed: "wte",
        pos_embed: Some("wpe"),
        layers: "h",
        final_norm: "ln_f",
        norm: NormKind::Layer,
        norm_attn: "ln_1",
        norm_mlp: "ln_2",
        attn: "attn",
        qkv: QkvNames::Fused("c_attn"),
        o_proj: "c_proj",
        mlp: MlpNames::Plain { fc: "c_fc", proj: "c_proj" },
        layout: WeightLayout::Conv1d,
        positions: Positions::Learned,
        qkv_bias: Switch::Always,
        o_bias: Switch::Always,
        mlp_bias: Switch::Always,
        qk_norm: None,
        sliding_window: Switch::Never,
        buffers: &[".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq"],
    },
];

impl Arch {
    pub fn spec(self) -> &'static ArchSpec {
        ARCHS.iter().find(|s| s.arch == self).expect("every Arch has a table entry")
    }

    pub fn from_model_type(model_type: &str) -> Option<Arch> {
        ARCHS.iter().find(|s| s.model_type == model_type).map(|s| s.arch)
    }

    pub fn model_type(self) -> &'static str {
        self.spec().model_type
    }

    pub fn hf_class(self) -> &'static str {
        self.spec().hf_class
    }

    /// The supported `model_type`s, for messages.
    pub fn supported() -> String {
        ARCHS.iter().map(|s| s.model_type).collect::<Vec<_>>().join(", ")
    }
}

/// What a parameter does, for slicing it when a model is pruned: which of its dimensions
/// run over hidden channels, query heads, kv heads or FFN channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamRole {
    /// Embeddings, head, norms, learned positions: last dimension is hidden.
    HiddenLast,
    /// Per-head q/k norm weights (`[head_dim]`): never sliced.
    PerHead,
    /// Projections from hidden to query heads / kv heads / FFN channels.
    Query,
    KeyValue,
    /// GPT-2's fused `[q | k | v]` projection.
    FusedQkv,
    MlpIn,
    /// Projections back to hidden from query heads / FFN channels.
    AttnOut,
    MlpOut,
}

impl ArchSpec {
    /// The role of a parameter from its name inside a block (`self_attn.q_proj.weight`).
    pub fn param_role(&self, block_param: &str) -> ParamRole {
        let module = block_param.rsplit_once('.').map_or(block_param, |(m, _)| m);
        let attn = |n: &str| format!("{}.{n}", self.attn);
        let mlp = |n: &str| format!("mlp.{n}");
        if let Some((q, k)) = self.qk_norm {
            if module == attn(q) || module == attn(k) {
                return ParamRole::PerHead;
            }
        }
        match self.qkv {
            QkvNames::Separate { q, k, v } => {
                if module == attn(q) {
                    return ParamRole::Query;
                }
                if module == attn(k) || module == attn(v) {
                    return ParamRole::KeyValue;
                }
            }
            QkvNames::Fused(f) => {
                if module == attn(f) {
                    return ParamRole::FusedQkv;
                }
            }
        }
        if module == attn(self.o_proj) {
            return ParamRole::AttnOut;
        }
        match self.mlp {
            MlpNames::Gated { gate, up, down } => {
                if module == mlp(gate) || module == mlp(up) {
                    return ParamRole::MlpIn;
                }
                if module == mlp(down) {
                    return ParamRole::MlpOut;
                }
            }
            MlpNames::Plain { fc, proj } => {
                if module == mlp(fc) {
                    return ParamRole::MlpIn;
                }
                if module == mlp(proj) {
                    return ParamRole::MlpOut;
                }
            }
        }
        ParamRole::HiddenLast
    }

    /// `model.layers.` / `transformer.h.`: the prefix of block parameters.
    pub fn layer_prefix(&self) -> String {
        format!("{}.{}.", self.body, self.layers)
    }

    /// Whether a checkpoint entry is a buffer some writers save (ignored on load).
    pub fn is_buffer(&self, name: &str) -> bool {
        self.buffers.iter().any(|b| name.ends_with(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_arch_has_one_entry_and_round_trips_its_model_type() {
        for arch in [Arch::Llama, Arch::Mistral, Arch::Qwen2, Arch::Qwen3, Arch::Gpt2] {
            assert_eq!(ARCHS.iter().filter(|s| s.arch == arch).count(), 1);
            assert_eq!(Arch::from_model_type(arch.model_type()), Some(arch));
        }
        assert_eq!(Arch::from_model_type("bert"), None);
        assert_eq!(Arch::supported(), "llama, mistral, qwen2, qwen3, gpt2");
    }

    #[test]
    fn parameter_roles_follow_the_names_of_each_architecture() {
        let llama = Arch::Llama.spec();
        assert_eq!(llama.param_role("self_attn.q_proj.weight"), ParamRole::Query);
        assert_eq!(llama.param_role("self_attn.v_proj.bias"), ParamRole::KeyValue);
        assert_eq!(llama.param_role("self_attn.o_proj.weight"), ParamRole::AttnOut);
        assert_eq!(llama.param_role("mlp.up_proj.weight"), ParamRole::MlpIn);
        assert_eq!(llama.param_role("mlp.down_proj.weight"), ParamRole::MlpOut);
        assert_eq!(llama.param_role("input_layernorm.weight"), ParamRole::HiddenLast);
        assert_eq!(Arch::Qwen3.spec().param_role("self_attn.k_norm.weight"), ParamRole::PerHead);
        let gpt2 = Arch::Gpt2.spec();
        assert_eq!(gpt2.param_role("attn.c_attn.weight"), ParamRole::FusedQkv);
        assert_eq!(gpt2.param_role("attn.c_proj.bias"), ParamRole::AttnOut);
        assert_eq!(gpt2.param_role("mlp.c_fc.weight"), ParamRole::MlpIn);
        assert_eq!(gpt2.param_role("mlp.c_proj.weight"), ParamRole::MlpOut);
        assert_eq!(gpt2.param_role("ln_1.bias"), ParamRole::HiddenLast);
        assert_eq!(gpt2.layer_prefix(), "transformer.h.");
        assert!(gpt2.is_buffer("transformer.h.0.attn.masked_bias"));
        assert!(!llama.is_buffer("model.layers.0.self_attn.q_proj.weight"));
    }

    #[test]
    fn bias_rules_match_transformers() {
        // Qwen2 always has q/k/v biases and no o_proj bias; Mistral none; Llama per config.
        assert_eq!(Arch::Qwen2.spec().qkv_bias, Switch::Always);
        assert_eq!(Arch::Qwen2.spec().o_bias, Switch::Never);
        assert_eq!(Arch::Mistral.spec().qkv_bias, Switch::Never);
        assert_eq!(Arch::Llama.spec().qkv_bias, Switch::Config("attention_bias", false));
        assert_eq!(Arch::Qwen3.spec().o_bias, Switch::Config("attention_bias", false));
    }
}
