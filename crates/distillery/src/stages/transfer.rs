//! kd-generate: the teacher's transfer set. Completions for prompts (greedy at temperature
//! 0, sampled otherwise, deterministic per seed and independent of batching), optionally
//! with the teacher's top-K log-probabilities stored for offline distillation; or, in scoring
//! mode, the top-K at every predicted position of existing records.
use crate::base::progress::Progress;
use crate::base::rng::{stream, Stream, SplitMix64};
use crate::data::encode::{record_tokens, Layout};
use crate::data::records::{id_of, prompt_of, write_jsonl, Record};
use crate::data::teacher_logits::{bytes_per_row, sidecar_path, LogitsWriter};
use crate::model::decode::Sampling;
use crate::model::tokenizer::{apply_chat_template, Tok};
use crate::model::ModelFiles;
use crate::teacher::{Predictions, Query, Teacher};
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

pub struct TransferOptions {
    pub prompts: PathBuf,
    pub out: PathBuf,
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_k: Option<i64>,
    pub top_p: Option<f64>,
    pub seed: u64,
    pub samples: usize,
    pub batch_size: usize,
    pub stop: Vec<String>,
    /// Render prompts through this chat template (the teacher tokenizer's).
    pub chat_template: Option<String>,
    pub ignore_eos: bool,
    pub store_logits: Option<i64>,
}

impl TransferOptions {
    /// Checks that need no model.
    pub fn validate(&self, score: bool) -> Result<()> {
        ensure!(self.temperature >= 0.0, "--temperature must be >= 0");
        ensure!(self.samples >= 1, "--samples must be at least 1");
        ensure!(self.batch_size >= 1, "--batch-size must be at least 1");
        if let Some(p) = self.top_p {
            ensure!(p > 0.0 && p <= 1.0, "--top-p must be in (0, 1]");
        }
        ensure!(!score || self.store_logits.is_some(), "--score stores logits: give --store-logits K");
        Ok(())
    }
}

/// Generates the transfer set; returns the summary lines.
pub fn generate(
    o: &TransferOptions,
    numbered: &[(usize, Record)],
    teacher: &dyn Teacher,
    tok: &Tok,
    files: &ModelFiles,
    eos: &[i64],
    pad: i64,
) -> Result<String> {
    o.validate(false)?;
    // One job per (record, sample); each has its own sampling stream.
    let mut jobs = vec![];
    for (idx, (line, rec)) in numbered.iter().enumerate() {
        let prompt = prompt_of(rec, &o.prompts, *line)?;
        let ids = match &o.chat_template {
            // The rendered template carries its own special tokens.
            Some(t) => tok.encode(&apply_chat_template(files, t, &prompt)?, false),
            None => tok.encode(&prompt, true),
        }
        .with_context(|| format!("{}:{line}", o.prompts.display()))?;
        ensure!(!ids.is_empty(), "{}:{line}: prompt has no tokens", o.prompts.display());
        for s in 0..o.samples {
            jobs.push((idx, s, prompt.clone(), ids.clone()));
        }
    }
    // Similar lengths together keep padding low; outputs are put back in input order.
    let mut order: Vec<usize> = (0..jobs.len()).collect();
    order.sort_by_key(|&j| std::cmp::Reverse(jobs[j].3.len()));
    let sampling = Sampling {
        max_new_tokens: o.max_new_tokens,
        temperature: o.temperature,
        top_k: o.top_k,
        top_p: o.top_p,
        eos: if o.ignore_eos { vec![] } else { eos.to_vec() },
        pad,
    };
    let mut completions: Vec<Vec<i64>> = vec![vec![]; jobs.len()];
    let mut progress = Progress::new("generate", jobs.len() as u64);
    let started = std::time::Instant::now();
    for chunk in order.chunks(o.batch_size) {
        let prompts: Vec<Vec<i64>> = chunk.iter().map(|&j| jobs[j].3.clone()).collect();
        let mut rngs: Vec<SplitMix64> = chunk.iter().map(|&j| stream(o.seed, Stream::Generate { record: jobs[j].0, sample: jobs[j].1 })).collect();
        let stop = |ids: &[i64]| !o.stop.is_empty() && tok.decode(ids, true).is_ok_and(|t| o.stop.iter().any(|s| t.contains(s.as_str())));
        let outs = teacher.generate(&prompts, &sampling, &mut rngs, &stop)?;
        for (&j, out) in chunk.iter().zip(outs) {
            completions[j] = out;
        }
        progress.inc(chunk.len() as u64, "");
    }
    progress.finish();
    let gen_secs = started.elapsed().as_secs_f64();

    let prompts: Vec<Vec<i64>> = jobs.iter().map(|j| j.3.clone()).collect();
    let pointers = match o.store_logits {
        Some(k) => Some(store_logits(teacher, &prompts, &completions, k, &o.out, o.batch_size)?),
        None => None,
    };
    let teacher_info = json!({
        "model": teacher.name(),
        "temperature": o.temperature,
        "top_k": o.top_k,
        "top_p": o.top_p,
        "max_new_tokens": o.max_new_tokens,
        "seed": o.seed,
    });
    let mut out: Vec<Record> = Vec::with_capacity(jobs.len());
    for (j, (idx, s, prompt, ids)) in jobs.iter().enumerate() {
        let mut rec = numbered[*idx].1.clone();
        let parent = id_of(&rec).to_string();
        if o.samples > 1 {
            rec.insert("id".into(), json!(format!("{parent}#s{s}")));
            rec.insert("parent".into(), json!(parent));
        }
        rec.remove("text");
        rec.insert("prompt".into(), json!(prompt));
        rec.insert("completion".into(), json!(tok.decode(&completions[j], true)?));
        rec.insert("prompt_ids".into(), json!(ids));
        rec.insert("completion_ids".into(), json!(completions[j]));
        rec.insert("source".into(), Value::from("teacher"));
        rec.insert("teacher".into(), teacher_info.clone());
        if let Some(p) = &pointers {
            rec.insert("teacher_logits".into(), p[j].clone());
        }
        out.push(rec);
    }
    // The sidecar was written first: a JSONL whose pointers lead nowhere never exists.
    write_jsonl(&o.out, &out)?;
    let tokens: usize = completions.iter().map(Vec::len).sum();
    let mut line = format!(
        "{}: {} completions, {tokens} new tokens in {gen_secs:.2}s ({:.1} tokens/s) -> {}",
        teacher.name(),
        out.len(),
        tokens as f64 / gen_secs.max(1e-9),
        o.out.display()
    );
    if let Some(k) = o.store_logits {
        line += &format!("\nteacher logits: top-{k}, {} bytes per token -> {}", bytes_per_row(k), sidecar_path(&o.out).display());
    }
    Ok(line)
}

/// The teacher's top-K at every completion position: the temperature-1 distribution each
/// completion token was predicted from, written to the sidecar before the JSONL.
fn store_logits(teacher: &dyn Teacher, prompts: &[Vec<i64>], completions: &[Vec<i64>], k: i64, out: &Path, batch: usize) -> Result<Vec<Value>> {
    ensure!(k >= 1 && k <= teacher.vocab_size(), "--store-logits must be in 1..={}", teacher.vocab_size());
    let seqs: Vec<Vec<i64>> = prompts.iter().zip(completions).map(|(p, c)| p.iter().chain(c).copied().collect()).collect();
    let queries: Vec<Query> = seqs.iter().enumerate().map(|(i, s)| Query { record: i, ids: s, from: prompts[i].len() }).collect();
    let file = sidecar_path(out);
    let file_name = file.file_name().unwrap().to_string_lossy().into_owned();
    let mut writer = LogitsWriter::new(k);
    let mut pointers = vec![Value::Null; seqs.len()];
    teacher.predict(&queries, batch, &mut |i, off, pred| {
        let Predictions::Dense(lp) = pred else { bail!("storing top-{k} logits needs the teacher's full distributions") };
        let mut pointer = writer.push_logprobs(&lp);
        if off == 0 {
            pointer["file"] = json!(file_name);
            pointers[i] = pointer;
        } else {
            // A long completion comes in several chunks: the record's rows grow.
            let rows = pointers[i]["rows"].as_i64().unwrap_or(0) + lp.size()[0];
            pointers[i]["rows"] = json!(rows);
        }
        Ok(())
    })?;
    // Completions with no tokens still point at their (empty) rows.
    for p in pointers.iter_mut().filter(|p| p.is_null()) {
        *p = json!({"row": writer.rows(), "rows": 0, "k": k, "file": file_name});
    }
    writer.write(&file)?;
    Ok(pointers)
}

/// Scoring mode: the teacher's top-K at every predicted position of existing records.
/// Text records get `prompt_ids` (the first token) and `completion_ids` (the rest), so that
/// row `i` predicts `completion_ids[i]` exactly as for generated records.
pub fn score(o: &TransferOptions, numbered: &[(usize, Record)], teacher: &dyn Teacher, tok: &Tok) -> Result<String> {
    o.validate(true)?;
    let k = o.store_logits.unwrap();
    let mut prompts = vec![];
    let mut completions = vec![];
    for (line, rec) in numbered {
        let t = record_tokens(rec, tok, Layout::Split).with_context(|| format!("{}:{line}", o.prompts.display()))?;
        prompts.push(t.prompt().to_vec());
        completions.push(t.completion().to_vec());
    }
    let pointers = store_logits(teacher, &prompts, &completions, k, &o.out, o.batch_size)?;
    let mut out = Vec::with_capacity(numbered.len());
    for (i, (_, rec)) in numbered.iter().enumerate() {
        let mut rec = rec.clone();
        rec.insert("prompt_ids".into(), json!(prompts[i]));
        rec.insert("completion_ids".into(), json!(completions[i]));
        rec.insert("teacher_logits".into(), pointers[i].clone());
        out.push(rec);
    }
    write_jsonl(&o.out, &out)?;
    let rows: usize = completions.iter().map(Vec::len).sum();
    Ok(format!(
        "scored {} records, {rows} positions, top-{k} at {} bytes per token -> {}",
        out.len(),
        bytes_per_row(k),
        sidecar_path(&o.out).display()
    ))
}
