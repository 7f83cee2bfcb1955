//! Model configuration read from a Hugging Face `config.json`.
//!
//! The typed [`ModelConfig`] holds what the forward pass needs; the original JSON is kept in
//! `raw` so that a saved checkpoint carries every field `transformers` expects, including
//! the ones this crate does not interpret.
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::Path;

/// The architectures this crate can run, chosen once from `model_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Gpt2,
}

impl Arch {
    pub const SUPPORTED: &'static str = "llama, mistral, qwen2, qwen3, gpt2";

    pub fn from_model_type(model_type: &str) -> Option<Arch> {
        Some(match model_type {
            "llama" => Arch::Llama,
            "mistral" => Arch::Mistral,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            "gpt2" => Arch::Gpt2,
            _ => return None,
        })
    }

    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gpt2 => "gpt2",
        }
    }

    /// The `architectures` entry `transformers` uses to pick the causal-LM class.
    pub fn hf_class(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Qwen3 => "Qwen3ForCausalLM",
            Arch::Gpt2 => "GPT2LMHeadModel",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    Silu,
    GeluTanh,
    Gelu,
    Relu,
}

impl Activation {
    fn parse(name: &str) -> Result<Activation> {
        Ok(match name {
            "silu" | "swish" => Activation::Silu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "gelu" => Activation::Gelu,
            "relu" => Activation::Relu,
            other => bail!("unsupported activation `{other}`"),
        })
    }
}

/// Llama 3 style frequency-dependent RoPE scaling.
#[derive(Clone, Debug, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_layers: i64,
    pub num_heads: i64,
    pub num_kv_heads: i64,
    pub head_dim: i64,
    pub max_position_embeddings: i64,
    /// RMSNorm epsilon (LayerNorm epsilon for gpt2).
    pub norm_eps: f64,
    pub rope_theta: f64,
    pub rope_llama3: Option<Llama3RopeScaling>,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections.
    pub qkv_bias: bool,
    /// Bias on the attention output projection.
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Qwen3: RMSNorm on each head's queries and keys before RoPE.
    pub qk_norm: bool,
    pub sliding_window: Option<i64>,
    pub activation: Activation,
    pub bos_token_id: Option<i64>,
    pub eos_token_ids: Vec<i64>,
    pub pad_token_id: Option<i64>,
    /// The full `config.json`, kept so that saving preserves unknown fields.
    pub raw: Value,
}

fn get_i64(v: &Value, key: &str) -> Option<i64> {
    v.get(key).and_then(Value::as_i64)
}
fn get_f64(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}
fn get_bool(v: &Value, key: &str) -> Option<bool> {
    v.get(key).and_then(Value::as_bool)
}
fn token_ids(v: Option<&Value>) -> Vec<i64> {
    match v {
        Some(Value::Number(n)) => n.as_i64().into_iter().collect(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_i64).collect(),
        _ => vec![],
    }
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<ModelConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let raw: Value = serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?;
        Self::from_json(raw).with_context(|| format!("{}", path.display()))
    }

    pub fn from_json(raw: Value) -> Result<ModelConfig> {
        let model_type = raw
            .get("model_type")
            .and_then(Value::as_str)
            .context("config has no `model_type`")?;
        let arch = Arch::from_model_type(model_type).with_context(|| {
            format!("unknown model_type `{model_type}` (supported: {})", Arch::SUPPORTED)
        })?;
        let need = |key: &str| get_i64(&raw, key).with_context(|| format!("config is missing `{key}`"));
        let cfg = if arch == Arch::Gpt2 {
            let hidden = need("n_embd")?;
            let heads = need("n_head")?;
            ModelConfig {
                arch,
                vocab_size: need("vocab_size")?,
                hidden_size: hidden,
                intermediate_size: get_i64(&raw, "n_inner").unwrap_or(4 * hidden),
                num_layers: need("n_layer")?,
                num_heads: heads,
                num_kv_heads: heads,
                head_dim: hidden / heads,
                max_position_embeddings: need("n_positions")?,
                norm_eps: get_f64(&raw, "layer_norm_epsilon").unwrap_or(1e-5),
                rope_theta: 0.0,
                rope_llama3: None,
                tie_word_embeddings: get_bool(&raw, "tie_word_embeddings").unwrap_or(true),
                qkv_bias: true,
                o_bias: true,
                mlp_bias: true,
                qk_norm: false,
                sliding_window: None,
                activation: Activation::parse(
                    raw.get("activation_function").and_then(Value::as_str).unwrap_or("gelu_new"),
                )?,
                bos_token_id: get_i64(&raw, "bos_token_id"),
                eos_token_ids: token_ids(raw.get("eos_token_id")),
                pad_token_id: get_i64(&raw, "pad_token_id"),
                raw: raw.clone(),
            }
        } else {
            let hidden = need("hidden_size")?;
            let heads = need("num_attention_heads")?;
            // transformers v5 moves rope settings into `rope_parameters`; v4 has
            // `rope_theta` at the top and `rope_scaling` beside it.
            let rope = raw.get("rope_parameters").or_else(|| raw.get("rope_scaling")).filter(|v| v.is_object());
            let rope_theta = get_f64(&raw, "rope_theta")
                .or_else(|| rope.and_then(|r| get_f64(r, "rope_theta")))
                .unwrap_or(10000.0);
            let rope_type = rope
                .and_then(|r| r.get("rope_type").or_else(|| r.get("type")))
                .and_then(Value::as_str)
                .unwrap_or("default");
            let rope_llama3 = match rope_type {
                "default" => None,
                "llama3" => {
                    let r = rope.unwrap();
                    let f = |k: &str| get_f64(r, k).with_context(|| format!("rope scaling llama3 is missing `{k}`"));
                    Some(Llama3RopeScaling {
                        factor: f("factor")?,
                        low_freq_factor: f("low_freq_factor")?,
                        high_freq_factor: f("high_freq_factor")?,
                        original_max_position_embeddings: f("original_max_position_embeddings")?,
                    })
                }
                other => bail!("unsupported rope type `{other}` (supported: default, llama3)"),
            };
            let attention_bias = get_bool(&raw, "attention_bias").unwrap_or(false);
            let use_sliding = match arch {
                Arch::Mistral => true,
                Arch::Qwen2 | Arch::Qwen3 => get_bool(&raw, "use_sliding_window").unwrap_or(false),
                _ => false,
            };
            ModelConfig {
                arch,
                vocab_size: need("vocab_size")?,
                hidden_size: hidden,
                intermediate_size: need("intermediate_size")?,
                num_layers: need("num_hidden_layers")?,
                num_heads: heads,
                num_kv_heads: get_i64(&raw, "num_key_value_heads").unwrap_or(heads),
                head_dim: get_i64(&raw, "head_dim").unwrap_or(hidden / heads),
                max_position_embeddings: get_i64(&raw, "max_position_embeddings").unwrap_or(2048),
                norm_eps: get_f64(&raw, "rms_norm_eps").unwrap_or(1e-6),
                rope_theta,
                rope_llama3,
                tie_word_embeddings: get_bool(&raw, "tie_word_embeddings").unwrap_or(false),
                qkv_bias: match arch {
                    Arch::Qwen2 => true,
                    Arch::Mistral => false,
                    _ => attention_bias,
                },
                o_bias: match arch {
                    Arch::Llama | Arch::Qwen3 => attention_bias,
                    _ => false,
                },
                mlp_bias: arch == Arch::Llama && get_bool(&raw, "mlp_bias").unwrap_or(false),
                qk_norm: arch == Arch::Qwen3,
                sliding_window: if use_sliding { get_i64(&raw, "sliding_window") } else { None },
                activation: Activation::parse(raw.get("hidden_act").and_then(Value::as_str).unwrap_or("silu"))?,
                bos_token_id: get_i64(&raw, "bos_token_id"),
                eos_token_ids: token_ids(raw.get("eos_token_id")),
                pad_token_id: get_i64(&raw, "pad_token_id"),
                raw: raw.clone(),
            }
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Shape rules every architecture shares; checked on load and before building a student.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
        ];
        for (name, v) in positive {
            if v <= 0 {
                bail!("`{name}` must be positive, got {v}");
            }
        }
        if self.num_heads % self.num_kv_heads != 0 {
            bail!(
                "num_key_value_heads ({}) must divide num_attention_heads ({})",
                self.num_kv_heads,
                self.num_heads
            );
        }
        if self.arch == Arch::Gpt2 && self.hidden_size % self.num_heads != 0 {
            bail!("n_head ({}) must divide n_embd ({})", self.num_heads, self.hidden_size);
        }
        if self.head_dim % 2 != 0 && self.arch != Arch::Gpt2 {
            bail!("head_dim ({}) must be even for rotary embeddings", self.head_dim);
        }
        Ok(())
    }

    /// Rewrites the shape fields of `raw` from the typed fields, so a changed config
    /// (a student) saves consistently. Keys use the architecture's own names.
    pub fn to_json(&self) -> Value {
        let mut raw = self.raw.clone();
        let obj = raw.as_object_mut().expect("config is a JSON object");
        let set = |obj: &mut serde_json::Map<String, Value>, k: &str, v: Value| {
            obj.insert(k.to_string(), v);
        };
        set(obj, "model_type", json!(self.arch.model_type()));
        set(obj, "architectures", json!([self.arch.hf_class()]));
        set(obj, "vocab_size", json!(self.vocab_size));
        set(obj, "tie_word_embeddings", json!(self.tie_word_embeddings));
        if self.arch == Arch::Gpt2 {
            set(obj, "n_embd", json!(self.hidden_size));
            set(obj, "n_head", json!(self.num_heads));
            set(obj, "n_layer", json!(self.num_layers));
            set(obj, "n_inner", json!(self.intermediate_size));
        } else {
            set(obj, "hidden_size", json!(self.hidden_size));
            set(obj, "num_attention_heads", json!(self.num_heads));
            set(obj, "num_key_value_heads", json!(self.num_kv_heads));
            set(obj, "num_hidden_layers", json!(self.num_layers));
            set(obj, "intermediate_size", json!(self.intermediate_size));
            set(obj, "head_dim", json!(self.head_dim));
            // `layer_types` lists one entry per layer in transformers v5; keep it consistent.
            if let Some(Value::Array(types)) = obj.get("layer_types").cloned() {
                let first = types.first().cloned().unwrap_or(json!("full_attention"));
                let n = self.num_layers as usize;
                let mut t: Vec<Value> = types.into_iter().take(n).collect();
                t.resize(n, first);
                set(obj, "layer_types", Value::Array(t));
            }
        }
        raw
    }

    pub fn kv_groups(&self) -> i64 {
        self.num_heads / self.num_kv_heads
    }
}
