//! Pieces every stage binary shares: error reporting and exit codes, and the model-loading
//! flags.
use crate::checkpoint::{load_model, ModelFiles};
use crate::model::CausalLm;
use crate::records::{full_text, ids_field, read_jsonl_numbered, text_parts, Record};
use crate::runtime::{parse_device, parse_dtype};
use crate::tokenizer::Tok;
use anyhow::{ensure, Context, Result};
use rayon::prelude::*;
use std::path::Path;
use tch::{Device, Kind};

/// Runs a stage's body; on error prints `stage: error: ...` with its causes and exits 1.
pub fn run(stage: &str, body: impl FnOnce() -> Result<()>) {
    crate::runtime::tune_cpu_allocator();
    if let Err(e) = body() {
        eprintln!("{stage}: error: {e}");
        for cause in e.chain().skip(1) {
            eprintln!("  caused by: {cause}");
        }
        std::process::exit(1);
    }
}

/// Resolves `--device` and `--dtype` together.
pub fn device_and_kind(device: &str, dtype: &str) -> Result<(Device, Kind)> {
    let d = parse_device(device)?;
    Ok((d, parse_dtype(dtype, d)?))
}

pub fn load(spec: &str, device: Device, kind: Kind) -> Result<(CausalLm, ModelFiles, Tok)> {
    let (model, files) = load_model(spec, device, kind).with_context(|| format!("loading model `{spec}`"))?;
    let tok = Tok::load(&files)?;
    Ok((model, files, tok))
}

/// Reads records and tokenizes each one's whole text with special tokens (CONTRACT.md's
/// rule for perplexity), in parallel. Errors name the file and line.
pub fn read_and_tokenize(path: &Path, tok: &Tok, max_length: Option<usize>) -> Result<(Vec<Record>, Vec<Vec<i64>>)> {
    let numbered = read_jsonl_numbered(path)?;
    let seqs = numbered
        .par_iter()
        .map(|(line, rec)| {
            let at = || format!("{}:{line}", path.display());
            // Token ids alone (no text) are taken as they are.
            let stored = match (ids_field(rec, "prompt_ids").with_context(at)?, ids_field(rec, "completion_ids").with_context(at)?) {
                (Some(p), Some(c)) if !rec.contains_key("text") && !rec.contains_key("prompt") => Some([p, c].concat()),
                _ => None,
            };
            let mut ids = match stored {
                Some(ids) => ids,
                None => tok.encode(&full_text(rec).with_context(at)?, true).with_context(at)?,
            };
            if let Some(m) = max_length {
                ids.truncate(m);
            }
            Ok(ids)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((numbered.into_iter().map(|(_, r)| r).collect(), seqs))
}

/// Total size of the files in a directory (the checkpoint's bytes on disk).
pub fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| entries.flatten().filter_map(|e| e.metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum())
        .unwrap_or(0)
}

/// A record's prompt and completion as token ids: stored `prompt_ids` + `completion_ids` as
/// they are; else `prompt` (with special tokens) and `completion` (without); else `text`
/// split after its first token, so that every later token is a prediction target.
pub fn prompt_completion_ids(rec: &Record, tok: &Tok) -> Result<(Vec<i64>, Vec<i64>)> {
    if let (Some(p), Some(c)) = (ids_field(rec, "prompt_ids")?, ids_field(rec, "completion_ids")?) {
        return Ok((p, c));
    }
    match text_parts(rec)? {
        (text, None) => {
            let mut ids = tok.encode(&text, true)?;
            ensure!(!ids.is_empty(), "text has no tokens");
            let rest = ids.split_off(1);
            Ok((ids, rest))
        }
        (prompt, Some(completion)) => Ok((tok.encode(&prompt, true)?, tok.encode(&completion, false)?)),
    }
}
