//! kd-tokenizer: a byte-level BPE tokenizer of a chosen size trained on the records a
//! student will serve, for a student with its own (smaller) vocabulary. With `like`, the
//! special tokens, the post-processor's template (BOS and the like) and the chat template of
//! that model are carried over, so prompts render the same way.
use crate::base::io::{atomic_dir, write_json_atomic};
use crate::data::records::{full_text, read_jsonl_numbered};
use crate::model::checkpoint::resolve;
use crate::model::token_bytes::TokenBytes;
use crate::model::tokenizer::Tok;
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::PathBuf;

pub struct TokenizerOptions {
    pub data: PathBuf,
    pub vocab_size: usize,
    pub out: PathBuf,
    /// A model whose special tokens and chat template the new tokenizer takes.
    pub like: Option<String>,
    /// Pairs seen fewer times than this are not merged.
    pub min_frequency: u64,
}

/// Special tokens (content, in id order) and the settings carried from `like`.
struct Carried {
    specials: Vec<String>,
    /// The post-processor, with special-token ids still the old tokenizer's.
    post_processor: Value,
    /// `tokenizer_config.json` keys kept as they are.
    config: serde_json::Map<String, Value>,
}

fn carried(like: Option<&str>) -> Result<Carried> {
    let Some(spec) = like else {
        return Ok(Carried {
            specials: vec!["<s>".into(), "</s>".into(), "<pad>".into()],
            post_processor: json!({"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [0], "tokens": ["<s>"]}}}),
            config: [("bos_token", "<s>"), ("eos_token", "</s>"), ("pad_token", "<pad>")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect(),
        });
    };
    let files = resolve(spec).with_context(|| format!("--like `{spec}`"))?;
    let path = files.side_file("tokenizer.json").with_context(|| format!("--like `{spec}` has no tokenizer.json"))?;
    let tj: Value = serde_json::from_str(&std::fs::read_to_string(path)?).with_context(|| format!("{}: invalid JSON", path.display()))?;
    let mut added: Vec<(i64, String)> = tj["added_tokens"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["special"].as_bool().unwrap_or(false))
        .filter_map(|a| Some((a["id"].as_i64()?, a["content"].as_str()?.to_string())))
        .collect();
    added.sort();
    let mut config = serde_json::Map::new();
    if let Some(p) = files.side_file("tokenizer_config.json") {
        let c: Value = serde_json::from_str(&std::fs::read_to_string(p)?).with_context(|| format!("{}: invalid JSON", p.display()))?;
        for key in ["bos_token", "eos_token", "pad_token", "unk_token", "chat_template", "model_max_length", "add_bos_token", "add_eos_token"] {
            if let Some(v) = c.get(key).filter(|v| !v.is_null()) {
                config.insert(key.into(), v.clone());
            }
        }
    }
    if let Some(p) = files.side_file("chat_template.jinja") {
        config.insert("chat_template".into(), json!(std::fs::read_to_string(p)?));
    }
    Ok(Carried { specials: added.into_iter().map(|a| a.1).collect(), post_processor: tj["post_processor"].clone(), config })
}

/// The post-processor with every special token's ids looked up again in the new vocabulary
/// (by content); one that names a token the new vocabulary lacks is refused.
fn remap_post_processor(p: &Value, ids: &HashMap<&str, usize>) -> Result<Value> {
    let mut p = p.clone();
    match p["type"].as_str() {
        Some("Sequence") => {
            if let Some(list) = p["processors"].as_array_mut() {
                for q in list.iter_mut() {
                    *q = remap_post_processor(q, ids)?;
                }
            }
        }
        Some("TemplateProcessing") => {
            if let Some(map) = p["special_tokens"].as_object_mut() {
                for (name, entry) in map.iter_mut() {
                    let tokens: Vec<String> = entry["tokens"].as_array().into_iter().flatten().filter_map(|t| t.as_str().map(String::from)).collect();
                    let new: Result<Vec<usize>> = tokens
                        .iter()
                        .map(|t| ids.get(t.as_str()).copied().with_context(|| format!("the template's special token `{name}` ({t}) is not in the new vocabulary")))
                        .collect();
                    entry["ids"] = json!(new?);
                }
            }
        }
        Some("BertProcessing" | "RobertaProcessing") => bail!("--like: a {} post-processor is not carried over", p["type"]),
        _ => {}
    }
    Ok(p)
}

/// Trains the tokenizer and writes `tokenizer.json` and `tokenizer_config.json` into `out`.
pub fn run(o: &TokenizerOptions) -> Result<String> {
    let records = read_jsonl_numbered(&o.data)?;
    let texts: Vec<String> = records
        .iter()
        .map(|(line, r)| full_text(r).with_context(|| format!("{}:{line}", o.data.display())))
        .collect::<Result<_>>()?;
    let c = carried(o.like.as_deref())?;
    let alphabet = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet();
    ensure!(
        o.vocab_size > alphabet.len() + c.specials.len(),
        "--vocab-size {} leaves no merges: byte-level BPE holds the {} byte symbols and {} special tokens first",
        o.vocab_size,
        alphabet.len(),
        c.specials.len()
    );
    // The trainer gives the special tokens the first ids, in order.
    let ids: HashMap<&str, usize> = c.specials.iter().enumerate().map(|(i, s)| (s.as_str(), i)).collect();
    let post = match &c.post_processor {
        Value::Null => json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true}),
        p => remap_post_processor(p, &ids)?,
    };
    let blank = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": {}, "merges": []}
    });
    let mut tokenizer: tokenizers::Tokenizer =
        blank.to_string().parse().map_err(|e| anyhow::anyhow!("building the tokenizer: {e}"))?;
    let specials: Vec<tokenizers::AddedToken> = c.specials.iter().map(|s| tokenizers::AddedToken::from(s.clone(), true)).collect();
    let bpe = tokenizers::models::bpe::BpeTrainer::builder()
        .vocab_size(o.vocab_size)
        .min_frequency(o.min_frequency)
        .special_tokens(specials)
        .initial_alphabet(alphabet.into_iter().collect())
        .show_progress(false)
        .build();
    let mut trainer = tokenizers::models::TrainerWrapper::BpeTrainer(bpe);
    tokenizer.train(&mut trainer, texts.iter()).map_err(|e| anyhow::anyhow!("training the tokenizer: {e}"))?;
    let text = tokenizer.to_string(false).map_err(|e| anyhow::anyhow!("writing the tokenizer: {e}"))?;
    let mut config = c.config.clone();
    config.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    config.entry("model_max_length").or_insert(json!(1_000_000_000_000_000_000u64));
    atomic_dir(&o.out, |dir| {
        std::fs::write(dir.join("tokenizer.json"), &text)?;
        write_json_atomic(&dir.join("tokenizer_config.json"), &Value::Object(config))
    })?;
    // Read back as every stage will, and measured on the data.
    let tok = Tok::from_inner(text.parse().map_err(|e| anyhow::anyhow!("re-reading the tokenizer: {e}"))?);
    let _ = TokenBytes::of(&tok)?;
    // The trainer stops early when no pair is seen --min-frequency times any more.
    let short = if tok.vocab_size() < o.vocab_size {
        format!(" (of {} asked: the data has no more pairs seen {} times)", o.vocab_size, o.min_frequency)
    } else {
        String::new()
    };
    Ok(format!(
        "tokenizer: {} tokens{short} ({} special) from {} records; {:.2} bytes per token on them; written to {}",
        tok.vocab_size(),
        c.specials.len(),
        texts.len(),
        bytes_per_token(&tok, &texts)?,
        o.out.display()
    ))
}

/// The bytes per token of `tok` on `texts` (for the report of kd-init `--tokenizer`).
pub fn bytes_per_token(tok: &Tok, texts: &[String]) -> Result<f64> {
    let bytes: usize = texts.iter().map(String::len).sum();
    let tokens: usize = texts.iter().map(|t| tok.encode(t, false).map(|v| v.len())).sum::<Result<usize>>()?;
    Ok(bytes as f64 / tokens.max(1) as f64)
}
