//! Tokenizers from `tokenizer.json` (the `tokenizers` crate), plus the special-token facts
//! generation needs from `generation_config.json` and `tokenizer_config.json`.
use crate::model::checkpoint::ModelFiles;
use crate::model::config::ModelConfig;
use anyhow::{Context, Result};
use serde_json::Value;

/// Cheap to clone: clones share one tokenizer (a 49k-token BPE holds tens of MB).
#[derive(Clone)]
pub struct Tok {
    inner: std::sync::Arc<tokenizers::Tokenizer>,
}

/// A template post-processor may only name special tokens it defines: tokenizers checks
/// this when a template is built in code, not when one is read from JSON, and then panics
/// while encoding.
fn check_templates(p: &Value) -> Result<()> {
    match p["type"].as_str() {
        Some("Sequence") => p["processors"].as_array().into_iter().flatten().try_for_each(check_templates),
        Some("TemplateProcessing") => {
            for piece in ["single", "pair"].iter().filter_map(|k| p[*k].as_array()).flatten() {
                if let Some(id) = piece["SpecialToken"]["id"].as_str() {
                    anyhow::ensure!(p["special_tokens"].get(id).is_some(), "template names special token `{id}`, which it does not define");
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

impl Tok {
    /// [`Tok::load`], or a clone of `loaded` (loaded from `loaded_files`) when both models
    /// have the same `tokenizer.json` (a student cut from its teacher): one copy in memory.
    pub fn load_or_share(files: &ModelFiles, loaded: &Tok, loaded_files: &ModelFiles) -> Result<Tok> {
        let read = |f: &ModelFiles| f.side_file("tokenizer.json").and_then(|p| std::fs::read(p).ok());
        match (read(files), read(loaded_files)) {
            (Some(a), Some(b)) if a == b => Ok(loaded.clone()),
            _ => Tok::load(files),
        }
    }

    pub fn load(files: &ModelFiles) -> Result<Tok> {
        let path = files
            .side_file("tokenizer.json")
            .with_context(|| format!("model `{}` has no tokenizer.json", files.name))?;
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        // tokenizers 0.22 panics on some JSON syntax errors (inside its decoder section)
        // instead of returning them: syntax is checked here first, and a panic on valid JSON
        // still becomes an error.
        let json: Value = serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?;
        check_templates(&json["post_processor"]).with_context(|| format!("{}: post_processor", path.display()))?;
        let loaded = std::panic::catch_unwind(|| <tokenizers::Tokenizer as std::str::FromStr>::from_str(&text))
            .map_err(|_| anyhow::anyhow!("{}: cannot load tokenizer: the tokenizers library failed on this file", path.display()))?;
        let inner = loaded.map_err(|e| anyhow::anyhow!("{}: cannot load tokenizer: {e}", path.display()))?;
        Ok(Tok { inner: std::sync::Arc::new(inner) })
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

    /// The `tokenizers` tokenizer itself (token tables, training).
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    pub fn from_inner(inner: tokenizers::Tokenizer) -> Tok {
        Tok { inner: std::sync::Arc::new(inner) }
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

/// The chat template of a tokenizer (`tokenizer_config.json`'s `chat_template`, or
/// `chat_template.jinja`), if it has one.
pub fn chat_template(files: &ModelFiles) -> Result<Option<String>> {
    if let Some(p) = files.side_file("chat_template.jinja") {
        return Ok(Some(std::fs::read_to_string(p)?));
    }
    let Some(p) = files.side_file("tokenizer_config.json") else { return Ok(None) };
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(p)?).with_context(|| format!("{}: invalid JSON", p.display()))?;
    Ok(match cfg.get("chat_template") {
        Some(Value::String(t)) => Some(t.clone()),
        // A list of named templates: the default one.
        Some(Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template").and_then(Value::as_str))
            .map(String::from),
        _ => None,
    })
}

/// A special token's text from `tokenizer_config.json` (a string or an AddedToken object).
fn special_token(files: &ModelFiles, key: &str) -> Option<String> {
    let p = files.side_file("tokenizer_config.json")?;
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()?;
    match cfg.get(key)? {
        Value::String(s) => Some(s.clone()),
        v => v.get("content").and_then(Value::as_str).map(String::from),
    }
}

/// Renders one user turn through the chat template with the generation prompt appended, as
/// `apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)`.
/// The result already holds the template's special tokens: tokenize it without adding more.
pub fn apply_chat_template(files: &ModelFiles, template: &str, text: &str) -> Result<String> {
    render_chat(files, template, &[("user", text)])
}

/// Renders `(role, content)` turns through the chat template with the generation prompt
/// appended, as transformers' `apply_chat_template(messages, add_generation_prompt=True)`.
pub fn render_chat(files: &ModelFiles, template: &str, messages: &[(&str, &str)]) -> Result<String> {
    let mut env = minijinja::Environment::new();
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
        Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
    });
    env.add_template("chat", template).map_err(|e| anyhow::anyhow!("chat template does not parse: {e}"))?;
    let turns: Vec<minijinja::Value> = messages.iter().map(|(role, content)| minijinja::context! { role => role, content => content }).collect();
    let ctx = minijinja::context! {
        messages => turns,
        add_generation_prompt => true,
        bos_token => special_token(files, "bos_token").unwrap_or_default(),
        eos_token => special_token(files, "eos_token").unwrap_or_default(),
    };
    env.get_template("chat")?.render(ctx).map_err(|e| anyhow::anyhow!("rendering the chat template: {e}"))
}
