//! Model configuration read from a Hugging Face `config.json`.
//!
//! The typed [`ModelConfig`] holds what the forward pass needs; the original JSON is kept in
//! `raw` so that a saved checkpoint carries every field `transformers` expects, including
//! the ones this crate does not interpret.
pub use crate::model::arch::Arch;
use crate::model::arch::{Positions, Switch};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::Path;

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
        let arch = Arch::from_model_type(model_type)
            .with_context(|| format!("unknown model_type `{model_type}` (supported: {})", Arch::supported()))?;
        let spec = arch.spec();
        let k = &spec.keys;
        let need = |key: &str| get_i64(&raw, key).with_context(|| format!("config is missing `{key}`"));
        let switch = |s: Switch| match s {
            Switch::Always => true,
            Switch::Never => false,
            Switch::Config(key, default) => get_bool(&raw, key).unwrap_or(default),
        };
        let hidden = need(k.hidden)?;
        let heads = need(k.heads)?;
        let rope = spec.positions == Positions::Rope;
        // transformers v5 moves rope settings into `rope_parameters`; v4 has `rope_theta` at
        // the top and `rope_scaling` beside it.
        let rope_params = raw.get("rope_parameters").or_else(|| raw.get("rope_scaling")).filter(|v| v.is_object());
        let rope_theta = if rope {
            get_f64(&raw, "rope_theta").or_else(|| rope_params.and_then(|r| get_f64(r, "rope_theta"))).unwrap_or(10000.0)
        } else {
            0.0
        };
        let rope_type = rope_params
            .filter(|_| rope)
            .and_then(|r| r.get("rope_type").or_else(|| r.get("type")))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let rope_llama3 = match rope_type {
            "default" => None,
            "llama3" => {
                let r = rope_params.unwrap();
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
        let max_position_embeddings = match spec.positions {
            Positions::Learned => need(k.max_positions)?,
            Positions::Rope => get_i64(&raw, k.max_positions).unwrap_or(2048),
        };
        let intermediate_size = match spec.positions {
            // GPT-2's n_inner is optional (4x hidden when absent or null).
            Positions::Learned => get_i64(&raw, k.intermediate).unwrap_or(4 * hidden),
            Positions::Rope => need(k.intermediate)?,
        };
        let cfg = ModelConfig {
            arch,
            vocab_size: need("vocab_size")?,
            hidden_size: hidden,
            intermediate_size,
            num_layers: need(k.layers)?,
            num_heads: heads,
            num_kv_heads: k.kv_heads.and_then(|key| get_i64(&raw, key)).unwrap_or(heads),
            head_dim: k.head_dim.and_then(|key| get_i64(&raw, key)).unwrap_or(hidden / heads),
            max_position_embeddings,
            norm_eps: get_f64(&raw, k.norm_eps).unwrap_or(spec.default_norm_eps),
            rope_theta,
            rope_llama3,
            tie_word_embeddings: get_bool(&raw, "tie_word_embeddings").unwrap_or(spec.default_tied),
            qkv_bias: switch(spec.qkv_bias),
            o_bias: switch(spec.o_bias),
            mlp_bias: switch(spec.mlp_bias),
            qk_norm: spec.qk_norm.is_some(),
            sliding_window: if switch(spec.sliding_window) { get_i64(&raw, "sliding_window") } else { None },
            activation: Activation::parse(raw.get(k.activation).and_then(Value::as_str).unwrap_or(spec.default_activation))?,
            bos_token_id: get_i64(&raw, "bos_token_id"),
            eos_token_ids: token_ids(raw.get("eos_token_id")),
            pad_token_id: get_i64(&raw, "pad_token_id"),
            raw: raw.clone(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn spec(&self) -> &'static crate::model::arch::ArchSpec {
        self.arch.spec()
    }

    /// A lower bound of the parameter count the config implies (embeddings, query
    /// projections, two MLP matrices per layer, a learned position table), without
    /// overflow: loading compares it with the weights before allocating the model.
    pub fn min_params(&self) -> i128 {
        let (v, h, i, l) = (self.vocab_size as i128, self.hidden_size as i128, self.intermediate_size as i128, self.num_layers as i128);
        let q = h.saturating_mul(self.num_heads as i128).saturating_mul(self.head_dim as i128);
        let positions = if self.spec().positions == Positions::Learned { (self.max_position_embeddings as i128).saturating_mul(h) } else { 0 };
        let layer = q.saturating_add(h.saturating_mul(i).saturating_mul(2));
        v.saturating_mul(h).saturating_add(l.saturating_mul(layer)).saturating_add(positions)
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
        let spec = self.spec();
        if spec.keys.head_dim.is_none() && self.hidden_size % self.num_heads != 0 {
            bail!("{} ({}) must divide {} ({})", spec.keys.heads, self.num_heads, spec.keys.hidden, self.hidden_size);
        }
        if self.head_dim % 2 != 0 && spec.positions == Positions::Rope {
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
        let k = &self.spec().keys;
        set(obj, k.hidden, json!(self.hidden_size));
        set(obj, k.heads, json!(self.num_heads));
        set(obj, k.layers, json!(self.num_layers));
        set(obj, k.intermediate, json!(self.intermediate_size));
        if let Some(key) = k.kv_heads {
            set(obj, key, json!(self.num_kv_heads));
        }
        if let Some(key) = k.head_dim {
            set(obj, key, json!(self.head_dim));
        }
        // `layer_types` lists one entry per layer in transformers v5; keep it consistent.
        if let Some(Value::Array(types)) = obj.get("layer_types").cloned() {
            let first = types.first().cloned().unwrap_or(json!("full_attention"));
            let n = self.num_layers as usize;
            let mut t: Vec<Value> = types.into_iter().take(n).collect();
            t.resize(n, first);
            set(obj, "layer_types", Value::Array(t));
        }
        raw
    }

    pub fn kv_groups(&self) -> i64 {
        self.num_heads / self.num_kv_heads
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> ModelConfig {
        ModelConfig::from_json(v).unwrap()
    }

    fn llama_like(model_type: &str) -> Value {
        json!({"model_type": model_type, "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
               "sliding_window": 32, "attention_bias": true})
    }

    #[test]
    fn each_architecture_reads_its_own_switches() {
        let llama = parse(llama_like("llama"));
        assert_eq!((llama.num_kv_heads, llama.head_dim, llama.rope_theta), (2, 16, 500000.0));
        assert!(llama.qkv_bias && llama.o_bias && !llama.mlp_bias && llama.sliding_window.is_none());
        let mistral = parse(llama_like("mistral"));
        assert!(!mistral.qkv_bias && !mistral.o_bias && mistral.sliding_window == Some(32));
        let qwen2 = parse(llama_like("qwen2"));
        assert!(qwen2.qkv_bias && !qwen2.o_bias && qwen2.sliding_window.is_none());
        let mut v = llama_like("qwen3");
        v["head_dim"] = json!(32);
        v["use_sliding_window"] = json!(true);
        let qwen3 = parse(v);
        assert!(qwen3.qk_norm && qwen3.head_dim == 32 && qwen3.sliding_window == Some(32));
        let gpt2 = parse(json!({"model_type": "gpt2", "vocab_size": 100, "n_embd": 64, "n_layer": 3, "n_head": 4, "n_positions": 128}));
        assert_eq!((gpt2.hidden_size, gpt2.intermediate_size, gpt2.num_kv_heads, gpt2.head_dim), (64, 256, 4, 16));
        assert!(gpt2.tie_word_embeddings && gpt2.qkv_bias && gpt2.mlp_bias && gpt2.activation == Activation::GeluTanh);
        assert_eq!(gpt2.rope_theta, 0.0);
    }

    #[test]
    fn rope_settings_in_either_transformers_layout() {
        let mut v4 = llama_like("llama");
        v4["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        assert_eq!(parse(v4).rope_llama3.unwrap().factor, 8.0);
        let mut v5 = llama_like("llama");
        v5.as_object_mut().unwrap().remove("rope_theta");
        v5["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 1e5});
        assert_eq!(parse(v5).rope_theta, 1e5);
    }

    #[test]
    fn bad_configs_are_named() {
        let err = ModelConfig::from_json(json!({"model_type": "bert"})).unwrap_err().to_string();
        assert!(err.contains("unknown model_type `bert`") && err.contains("gpt2"), "{err}");
        let mut v = llama_like("llama");
        v.as_object_mut().unwrap().remove("hidden_size");
        assert!(ModelConfig::from_json(v).unwrap_err().to_string().contains("hidden_size"));
        let mut v = llama_like("llama");
        v["num_key_value_heads"] = json!(3);
        assert!(ModelConfig::from_json(v).unwrap_err().to_string().contains("must divide"));
    }

    #[test]
    fn saving_writes_each_architecture_s_own_keys() {
        let mut gpt2 = parse(json!({"model_type": "gpt2", "vocab_size": 100, "n_embd": 64, "n_layer": 3, "n_head": 4, "n_positions": 128}));
        gpt2.num_layers = 2;
        let out = gpt2.to_json();
        assert_eq!(out["n_layer"], 2);
        assert!(out.get("num_hidden_layers").is_none() && out.get("head_dim").is_none());
        let mut llama = parse(llama_like("llama"));
        llama.num_kv_heads = 1;
        assert_eq!(llama.to_json()["num_key_value_heads"], 1);
        assert_eq!(llama.to_json()["architectures"], json!(["LlamaForCausalLM"]));
    }
}
