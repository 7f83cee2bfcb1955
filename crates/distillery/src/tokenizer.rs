//! Tokenizers from `tokenizer.json` (the `tokenizers` crate), plus the special-token facts
//! generation needs from `generation_config.json` and `tokenizer_config.json`.
use crate::checkpoint::ModelFiles;
use crate::config::ModelConfig;
use anyhow::{Context, Result};
use serde_json::Value;

pub struct Tok {
    inner: tokenizers::Tokenizer,
}

impl Tok {
    pub fn load(files: &ModelFiles) -> Result<Tok> {
        let path = files
            .side_file("tokenizer.json")
            .with_context(|| format!("model `{}` has no tokenizer.json", files.name))?;
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow::anyhow!("{}: cannot load tokenizer: {e}", path.display()))?;
        Ok(Tok { inner })
    }

    /// Token ids as `tokenizer(text, add_special_tokens=...)` gives them.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<i64>> {
        let enc = self.inner.encode(text, add_special_tokens).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
    }

    pub fn decode(&self, ids: &[i64], skip_special_tokens: bool) -> Result<String> {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.inner.decode(&ids, skip_special_tokens).map_err(|e| anyhow::anyhow!("decoding: {e}"))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<i64> {
        self.inner.token_to_id(token).map(i64::from)
    }
}

fn ids_of(v: Option<&Value>) -> Vec<i64> {
    match v {
        Some(Value::Number(n)) => n.as_i64().into_iter().collect(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_i64).collect(),
        _ => vec![],
    }
}

/// End-of-sequence and padding ids, as `generate` resolves them: `generation_config.json`
/// first, then `config.json`.
pub struct SpecialTokens {
    pub eos: Vec<i64>,
    pub pad: Option<i64>,
}

impl SpecialTokens {
    pub fn resolve(files: &ModelFiles, cfg: &ModelConfig) -> Result<SpecialTokens> {
        let gen: Option<Value> = match files.side_file("generation_config.json") {
            Some(p) => Some(
                serde_json::from_str(&std::fs::read_to_string(p)?)
                    .with_context(|| format!("{}: invalid JSON", p.display()))?,
            ),
            None => None,
        };
        let mut eos = gen.as_ref().map(|g| ids_of(g.get("eos_token_id"))).unwrap_or_default();
        if eos.is_empty() {
            eos = cfg.eos_token_ids.clone();
        }
        let pad = gen
            .as_ref()
            .and_then(|g| g.get("pad_token_id").and_then(Value::as_i64))
            .or(cfg.pad_token_id)
            .or(eos.first().copied());
        Ok(SpecialTokens { eos, pad })
    }
}
