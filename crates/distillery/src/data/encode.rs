//! The one rule that turns a record into token ids (CONTRACT.md's record fields).
//!
//! * [`Layout::Split`] (training, scoring, stored logits): stored `prompt_ids` +
//!   `completion_ids` are used as they are, since they are the ids the producing model's
//!   tokenizer gave (kd-generate writes them, chat template included). Otherwise the prompt
//!   is kept apart so it can be masked: `prompt` with special tokens, then `completion`
//!   without; a record with no completion is split after its first token, so every later
//!   token is a target.
//! * [`Layout::Whole`] (perplexity, calibration): CONTRACT.md's perplexity rule. The whole
//!   text is tokenized at once with special tokens (`text`, or `prompt` + `completion`
//!   joined); stored ids are used only for a record that has no text, so a swapped-in
//!   evaluator that reads text gets the same figures.
use crate::data::records::{full_text, ids_field, read_jsonl_numbered, text_parts, Record};
use crate::model::tokenizer::Tok;
use anyhow::{ensure, Context, Result};
use rayon::prelude::*;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    Whole,
    Split,
}

/// A record's tokens; `ids[prompt_len..]` are its targets (prompt_len is at least 1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordTokens {
    pub ids: Vec<i64>,
    pub prompt_len: usize,
}

impl RecordTokens {
    pub fn prompt(&self) -> &[i64] {
        &self.ids[..self.prompt_len.min(self.ids.len())]
    }

    pub fn completion(&self) -> &[i64] {
        &self.ids[self.prompt_len.min(self.ids.len())..]
    }
}

pub fn record_tokens(rec: &Record, tok: &Tok, layout: Layout) -> Result<RecordTokens> {
    let stored_first = layout == Layout::Split || !(rec.contains_key("text") || rec.contains_key("prompt"));
    if stored_first {
        if let (Some(p), Some(c)) = (ids_field(rec, "prompt_ids")?, ids_field(rec, "completion_ids")?) {
            let prompt_len = p.len().max(1);
            return Ok(RecordTokens { ids: [p, c].concat(), prompt_len });
        }
    }
    let ids = match (layout, text_parts(rec)?) {
        // Evaluation drops sequences too short to predict anything; no error here.
        (Layout::Whole, _) => return Ok(RecordTokens { ids: tok.encode(&full_text(rec)?, true)?, prompt_len: 1 }),
        (Layout::Split, (text, None)) => tok.encode(&text, true)?,
        (Layout::Split, (prompt, Some(completion))) => {
            let mut ids = tok.encode(&prompt, true)?;
            let prompt_len = ids.len().max(1);
            ids.extend(tok.encode(&completion, false)?);
            ensure!(!ids.is_empty(), "text has no tokens");
            return Ok(RecordTokens { ids, prompt_len });
        }
    };
    ensure!(!ids.is_empty(), "text has no tokens");
    Ok(RecordTokens { ids, prompt_len: 1 })
}

/// Reads records and tokenizes each one with `layout`, in parallel; sequences are cut at
/// `max_length`. Errors name the file and line.
pub fn read_tokenized(path: &Path, tok: &Tok, layout: Layout, max_length: Option<usize>) -> Result<(Vec<(usize, Record)>, Vec<RecordTokens>)> {
    let numbered = read_jsonl_numbered(path)?;
    let tokens = tokenize_all(&numbered, path, tok, layout, max_length)?;
    Ok((numbered, tokens))
}

/// [`record_tokens`] over numbered records, in parallel, errors naming `path` and the line.
pub fn tokenize_all(numbered: &[(usize, Record)], path: &Path, tok: &Tok, layout: Layout, max_length: Option<usize>) -> Result<Vec<RecordTokens>> {
    numbered
        .par_iter()
        .map(|(line, rec)| {
            let mut t = record_tokens(rec, tok, layout).with_context(|| format!("{}:{line}", path.display()))?;
            if let Some(m) = max_length {
                t.ids.truncate(m);
            }
            Ok(t)
        })
        .collect()
}
