//! kd-generate: the teacher's transfer set. Completions for prompts (greedy at temperature
//! 0, sampled otherwise, deterministic per seed and independent of batching), optionally
//! with the teacher's top-K log-probabilities stored for offline distillation; or, in scoring
//! mode, the top-K at every predicted position of existing records.
use crate::base::progress::Progress;
use crate::base::rng::{stream, Stream, SplitMix64};
use crate::data::encode::{record_tokens, Layout};
use crate::data::records::{id_of, prompt_of, write_jsonl, Record};
use crate::data::shard::{summary_path, Shard};
use crate::base::io::{file_fingerprint, write_json_atomic};
use crate::base::journal::Journal;
use crate::data::teacher_logits::{sidecar_path_for, sidecar_stats, size_line, LogitsFormat, LogitsWriter, TopRows};
use crate::model::decode::Sampling;
use crate::model::tokenizer::{apply_chat_template, Tok};
use crate::model::ModelFiles;
use crate::teacher::{top_rows_of, Teacher};
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
    /// Render prompts through the served teacher's own chat template, by the server
    /// ([`crate::teacher::served::ServedTeacher::chat_prompt_ids`]).
    pub server_chat_template: bool,
    pub ignore_eos: bool,
    pub store_logits: Option<i64>,
    /// How the sidecar stores the rows (`<out>.logits.safetensors` or `<out>.logits.topk`).
    pub logits_format: LogitsFormat,
    /// Continue from the journal of an interrupted run (`<out>.journal/`).
    pub resume: bool,
    /// The block of the prompts this run takes ([`Shard::WHOLE`] for all of them).
    pub shard: Shard,
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
        ensure!(!(self.server_chat_template && self.chat_template.is_some()), "--server-chat-template and --chat-template: give one");
        Ok(())
    }
}

/// The journal's identity of a run: the inputs' checksums and every setting that changes
/// the output.
fn fingerprint(o: &TransferOptions, mode: &str, teacher: &dyn Teacher) -> Result<Value> {
    Ok(json!({
        "stage": format!("kd-generate {mode}"),
        "prompts": file_fingerprint(&o.prompts)?,
        "teacher": teacher.name(),
        "device": teacher.local().map(|m| format!("{:?} {:?}", m.device(), m.kind())),
        "max_new_tokens": o.max_new_tokens,
        "temperature": o.temperature,
        "top_k": o.top_k,
        "top_p": o.top_p,
        "seed": o.seed,
        "samples": o.samples,
        "batch_size": o.batch_size,
        "stop": o.stop,
        "chat_template": o.chat_template,
        "server_chat_template": o.server_chat_template,
        "ignore_eos": o.ignore_eos,
        "store_logits": o.store_logits,
        "logits_format": o.logits_format.name(),
        "shard": o.shard.to_string(),
    }))
}

/// The settings a shard's manifest carries: those that change the output (the batch size
/// included: it decides the batches; not the device), so that kd-merge refuses shards made
/// differently.
fn shard_settings(o: &TransferOptions, mode: &str, teacher: &dyn Teacher) -> Result<Value> {
    let mut v = fingerprint(o, mode, teacher)?;
    for k in ["device", "shard", "prompts"] {
        v.as_object_mut().expect("an object").remove(k);
    }
    Ok(v)
}

/// `<out>.summary.json`: what kd-generate made, with the sidecar's size per stored token;
/// a shard's summary adds its manifest under `shard`. No timings, so that the same run gives
/// the same file.
#[allow(clippy::too_many_arguments)]
fn write_summary(
    o: &TransferOptions,
    mode: &str,
    teacher: &dyn Teacher,
    numbered: &[(usize, Record)],
    positions: &[usize],
    total: usize,
    tokens: usize,
) -> Result<Option<f64>> {
    let logits = match o.store_logits {
        Some(k) => Some(sidecar_stats(&sidecar_path_for(&o.out, o.logits_format), tokens as i64, k)?),
        None => None,
    };
    let per_token = logits.as_ref().and_then(|l| l["bytes_per_token"].as_f64());
    let mut summary = summary_value(mode, teacher.name(), positions.len(), tokens, logits);
    if o.shard != Shard::WHOLE {
        let mut manifest = o.shard.manifest("kd-generate", &o.prompts, shard_settings(o, mode, teacher)?, numbered.len())?;
        manifest["positions"] = json!(positions);
        manifest["total"] = json!(total);
        summary["shard"] = manifest;
    }
    write_json_atomic(&summary_path(&o.out), &summary)?;
    Ok(per_token)
}

/// kd-generate's summary (kd-merge builds a joined run's with the same function).
pub fn summary_value(mode: &str, teacher: &str, outputs: usize, tokens: usize, logits: Option<Value>) -> Value {
    json!({
        "stage": "kd-generate",
        "mode": mode,
        "teacher": teacher,
        "outputs": outputs,
        "tokens": tokens,
        "logits": logits,
    })
}

/// What the teacher made for each job: completion ids and, with stored logits, their rows.
struct Done {
    completions: Vec<Vec<i64>>,
    rows: Vec<Option<TopRows>>,
}

/// Runs the jobs (`prompts[j]`) batch by batch in `order`: generates their completions (or
/// takes `given` ones, in scoring mode) and with `k` stores the teacher's top-K at every
/// completion position. Finished batches go to the journal, which a resumed run reads back
/// instead of redoing them.
#[allow(clippy::too_many_arguments)]
fn run_jobs(
    o: &TransferOptions,
    teacher: &dyn Teacher,
    prompts: &[Vec<i64>],
    given: Option<&[Vec<i64>]>,
    order: &[usize],
    sampling: Option<(&Sampling, &dyn Fn(&[i64]) -> bool)>,
    journal: &mut Journal,
    label: &str,
) -> Result<Done> {
    let k = o.store_logits;
    if let Some(k) = k {
        ensure!(k >= 1 && k <= teacher.vocab_size(), "--store-logits must be in 1..={}", teacher.vocab_size());
    }
    let n = order.len();
    let mut done = Done { completions: vec![vec![]; prompts.len()], rows: (0..prompts.len()).map(|_| None).collect() };
    // Read back what earlier runs finished.
    let restored = journal.restored();
    for (range, extra) in journal.restored_parts() {
        let part_rows = match (k, &extra) {
            (Some(_), Some(path)) => Some(TopRows::read(path)?),
            (Some(_), None) => bail!("the journal's part for items {range:?} has no stored logits"),
            (None, _) => None,
        };
        let mut at = 0;
        for (pos, line) in restored[range.clone()].iter().enumerate() {
            let v: Value = serde_json::from_str(line).context("reading the journal")?;
            let j = v["job"].as_u64().context("journal line without `job`")? as usize;
            ensure!(order.get(range.start + pos) == Some(&j), "the journal's items are not in this run's order; remove it to start over");
            let ids: Vec<i64> = serde_json::from_value(v["ids"].clone()).context("journal line without `ids`")?;
            if let Some(r) = &part_rows {
                let m = ids.len() as i64;
                ensure!(at + m <= r.rows(), "the journal's stored logits are shorter than its items");
                done.rows[j] = Some(r.narrow(at, m));
                at += m;
            }
            done.completions[j] = ids;
        }
    }
    let skip = journal.done();
    ensure!(skip % o.batch_size == 0 || skip == n, "the journal ends inside a batch; remove it to start over");
    let mut progress = Progress::new(label, (n - skip) as u64);
    let mut part: Vec<TopRows> = vec![];
    let mut new_tokens = 0usize;
    let started = std::time::Instant::now();
    for (b, batch) in order.chunks(o.batch_size).enumerate().skip(skip / o.batch_size) {
        let ps: Vec<Vec<i64>> = batch.iter().map(|&j| prompts[j].clone()).collect();
        let (outs, rows) = match (sampling, given) {
            (Some((sampling, stop)), _) => {
                let mut rngs: Vec<SplitMix64> = batch.iter().map(|&j| stream(o.seed, o.stream_of(j))).collect();
                teacher.generate_top(&ps, sampling, &mut rngs, stop, k, o.batch_size)?
            }
            (None, Some(given)) => {
                let outs: Vec<Vec<i64>> = batch.iter().map(|&j| given[j].clone()).collect();
                let rows = k.map(|k| top_rows_of(teacher, &ps, &outs, k, o.batch_size)).transpose()?;
                (outs, rows)
            }
            (None, None) => unreachable!("scoring mode passes its completions"),
        };
        if let Some(rows) = rows {
            for (&j, r) in batch.iter().zip(rows) {
                part.push(r.shallow_clone());
                done.rows[j] = Some(r);
            }
        }
        new_tokens += outs.iter().map(Vec::len).sum::<usize>();
        for (&j, out) in batch.iter().zip(outs) {
            journal.push(json!({"job": j, "ids": out}).to_string());
            done.completions[j] = out;
        }
        progress.inc(batch.len() as u64, &format!("{:.1} tokens/s", new_tokens as f64 / started.elapsed().as_secs_f64().max(1e-9)));
        let last = (b + 1) * o.batch_size >= n;
        if journal.due() || last {
            match k {
                Some(k) => {
                    let rows = TopRows::cat(&part, k);
                    journal.commit(Some(&|p: &Path| rows.write_to(p)))?;
                }
                None => journal.commit(None)?,
            }
            part.clear();
        }
    }
    progress.finish();
    Ok(done)
}

impl TransferOptions {
    /// The sampling stream of job `j` (record `j / samples`, sample `j % samples`); jobs are
    /// counted over the whole prompts file whatever the shard.
    fn stream_of(&self, j: usize) -> Stream {
        Stream::Generate { record: j / self.samples, sample: j % self.samples }
    }
}

/// The sidecar from every job's rows in job order, written before the JSONL; returns each
/// job's pointer.
fn write_sidecar(rows: Vec<Option<TopRows>>, k: i64, out: &Path, format: LogitsFormat) -> Result<Vec<Value>> {
    let file = sidecar_path_for(out, format);
    let file_name = file.file_name().unwrap().to_string_lossy().into_owned();
    let mut writer = LogitsWriter::with_format(k, format);
    let mut pointers = vec![];
    for r in rows {
        let mut p = writer.push_rows(r.unwrap_or_else(|| TopRows::empty(k)));
        p["file"] = json!(file_name);
        pointers.push(p);
    }
    writer.write(&file)?;
    Ok(pointers)
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
    // One job per (record, sample), in output order; each has its own sampling stream.
    let mut jobs = vec![];
    let texts: Vec<String> = numbered.iter().map(|(line, rec)| prompt_of(rec, &o.prompts, *line)).collect::<Result<_>>()?;
    let rendered = match o.server_chat_template {
        true => Some(teacher.served().context("--server-chat-template needs a served teacher (--teacher-url)")?.chat_prompt_ids(&texts)?),
        false => None,
    };
    for (idx, ((line, _), prompt)) in numbered.iter().zip(texts).enumerate() {
        let ids = match (&rendered, &o.chat_template) {
            (Some(r), _) => Ok(r[idx].clone()),
            // The rendered template carries its own special tokens.
            (None, Some(t)) => tok.encode(&apply_chat_template(files, t, &prompt)?, false),
            (None, None) => tok.encode(&prompt, true),
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
    // A shard runs its block of those batches; its outputs keep job order.
    let order = order[o.shard.batch_block(order.len(), o.batch_size)?].to_vec();
    let mut mine = order.clone();
    mine.sort_unstable();
    let sampling = Sampling {
        max_new_tokens: o.max_new_tokens,
        temperature: o.temperature,
        top_k: o.top_k,
        top_p: o.top_p,
        eos: if o.ignore_eos { vec![] } else { eos.to_vec() },
        pad,
        stop: o.stop.clone(),
    };
    let mut journal = Journal::open(&o.out, fingerprint(o, "generate", teacher)?, o.resume)?;
    let prompts: Vec<Vec<i64>> = jobs.iter().map(|j| j.3.clone()).collect();
    let started = std::time::Instant::now();
    let stop = |ids: &[i64]| !o.stop.is_empty() && tok.decode(ids, true).is_ok_and(|t| o.stop.iter().any(|s| t.contains(s.as_str())));
    let done = run_jobs(o, teacher, &prompts, None, &order, Some((&sampling, &stop)), &mut journal, "generate")?;
    let gen_secs = started.elapsed().as_secs_f64();
    let completions = done.completions;
    let mut rows = done.rows;
    let pointers = match o.store_logits {
        Some(k) => Some(write_sidecar(mine.iter().map(|&j| rows[j].take()).collect(), k, &o.out, o.logits_format)?),
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
    let mut out: Vec<Record> = Vec::with_capacity(mine.len());
    for (at, &j) in mine.iter().enumerate() {
        let (idx, s, prompt, ids) = &jobs[j];
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
            rec.insert("teacher_logits".into(), p[at].clone());
        }
        out.push(rec);
    }
    // The sidecar was written first: a JSONL whose pointers lead nowhere never exists.
    let tokens: usize = mine.iter().map(|&j| completions[j].len()).sum();
    let per_token = write_summary(o, "generate", teacher, numbered, &mine, jobs.len(), tokens)?;
    write_jsonl(&o.out, &out)?;
    journal.finish()?;
    let mut line = format!(
        "{}: {} completions, {tokens} new tokens in {gen_secs:.2}s ({:.1} tokens/s) -> {}",
        teacher.name(),
        out.len(),
        tokens as f64 / gen_secs.max(1e-9),
        o.out.display()
    );
    if let (Some(k), Some(b)) = (o.store_logits, per_token) {
        line += &format!("\nteacher logits: top-{k}, {} -> {}", size_line(o.logits_format, k, b), sidecar_path_for(&o.out, o.logits_format).display());
    }
    Ok(line)
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
    let mut journal = Journal::open(&o.out, fingerprint(o, "score", teacher)?, o.resume)?;
    // Batches are runs of records in file order; a shard takes its block of them.
    let order: Vec<usize> = o.shard.batch_block(numbered.len(), o.batch_size)?.collect();
    let done = run_jobs(o, teacher, &prompts, Some(&completions), &order, None, &mut journal, "score")?;
    let mut rows = done.rows;
    let pointers = write_sidecar(order.iter().map(|&i| rows[i].take()).collect(), k, &o.out, o.logits_format)?;
    let mut out = Vec::with_capacity(order.len());
    for (at, &i) in order.iter().enumerate() {
        let mut rec = numbered[i].1.clone();
        rec.insert("prompt_ids".into(), json!(prompts[i]));
        rec.insert("completion_ids".into(), json!(completions[i]));
        rec.insert("teacher_logits".into(), pointers[at].clone());
        out.push(rec);
    }
    let rows: usize = order.iter().map(|&i| completions[i].len()).sum();
    let per_token = write_summary(o, "score", teacher, numbered, &order, numbered.len(), rows)?;
    write_jsonl(&o.out, &out)?;
    journal.finish()?;
    Ok(format!(
        "scored {} records, {rows} positions, top-{k} at {} -> {}",
        out.len(),
        size_line(o.logits_format, k, per_token.unwrap_or(f64::NAN)),
        sidecar_path_for(&o.out, o.logits_format).display()
    ))
}
