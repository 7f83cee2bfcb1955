//! Augmentation (kd-augment): new records from existing ones, each tagged
//! `source: augment:<op>` with its `parent`. Word operations (delete, swap, mask) are pure
//! functions of the text, a ratio and a seeded stream, so outputs are reproducible and
//! testable exactly; teacher operations (infill, paraphrase, backtranslate, resample)
//! generate with the teacher, seeded per record, operation and copy.
use crate::model::decode::Sampling;
use crate::teacher::Teacher;
use crate::data::records::{id_of, str_field, write_jsonl, Record};
use crate::data::shard::{summary_path, Shard};
use crate::base::rng::{stream, SplitMix64, Stream};
use crate::base::progress::Progress;
use crate::model::tokenizer::Tok;
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use crate::base::io::{file_fingerprint, write_json_atomic};
use crate::base::journal::Journal;
use std::cell::{Cell, RefCell};
use std::path::Path;

fn words(text: &str) -> Vec<&str> {
    text.split_whitespace().collect()
}

/// How many words an operation touches: `ratio` of them, at least one.
fn count(n: usize, ratio: f64) -> usize {
    ((n as f64 * ratio).round() as usize).clamp(1, n.max(1))
}

/// Drops each word with probability `ratio`, always keeping at least one.
pub fn delete_words(text: &str, ratio: f64, rng: &mut SplitMix64) -> String {
    let w = words(text);
    let kept: Vec<&str> = w.iter().copied().filter(|_| rng.next_f64() >= ratio).collect();
    if kept.is_empty() {
        return w.get(rng.below(w.len().max(1))).copied().unwrap_or("").to_string();
    }
    kept.join(" ")
}

/// Swaps `ratio * n` random pairs of words.
pub fn swap_words(text: &str, ratio: f64, rng: &mut SplitMix64) -> String {
    let mut w = words(text);
    if w.len() < 2 {
        return w.join(" ");
    }
    for _ in 0..count(w.len(), ratio) {
        let (a, b) = (rng.below(w.len()), rng.below(w.len()));
        w.swap(a, b);
    }
    w.join(" ")
}

/// Where a span of `ratio * n` words starts: `(start, len)`.
pub fn pick_span(n: usize, ratio: f64, rng: &mut SplitMix64) -> (usize, usize) {
    let len = count(n, ratio);
    let start = rng.below(n - len + 1);
    (start, len)
}

/// Replaces one random span of `ratio * n` words with `mask`.
pub fn mask_span(text: &str, ratio: f64, mask: &str, rng: &mut SplitMix64) -> String {
    let w = words(text);
    if w.is_empty() {
        return String::new();
    }
    let (start, len) = pick_span(w.len(), ratio, rng);
    let mut out: Vec<&str> = w[..start].to_vec();
    out.push(mask);
    out.extend_from_slice(&w[start + len..]);
    out.join(" ")
}

/// Splits a text around a span for teacher infilling: (prefix, removed span, suffix).
pub fn split_for_infill(text: &str, ratio: f64, rng: &mut SplitMix64) -> (String, String, String) {
    let w = words(text);
    if w.len() < 2 {
        return (text.to_string(), String::new(), String::new());
    }
    // The span never starts at 0, so the teacher always has some left context.
    let (start, len) = pick_span(w.len() - 1, ratio, rng);
    let start = start + 1;
    (w[..start].join(" "), w[start..start + len].join(" "), w[start + len..].join(" "))
}

/// Fills a template's `{text}` placeholder.
pub fn fill_template(template: &str, text: &str) -> String {
    template.replace("{text}", text)
}

/// An augmentation operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AugmentOp {
    Delete,
    Swap,
    Mask,
    Infill,
    Paraphrase,
    Backtranslate,
    Resample,
}

impl AugmentOp {
    pub const ALL: [AugmentOp; 7] = [
        AugmentOp::Delete,
        AugmentOp::Swap,
        AugmentOp::Mask,
        AugmentOp::Infill,
        AugmentOp::Paraphrase,
        AugmentOp::Backtranslate,
        AugmentOp::Resample,
    ];

    pub fn name(self) -> &'static str {
        match self {
            AugmentOp::Delete => "delete",
            AugmentOp::Swap => "swap",
            AugmentOp::Mask => "mask",
            AugmentOp::Infill => "infill",
            AugmentOp::Paraphrase => "paraphrase",
            AugmentOp::Backtranslate => "backtranslate",
            AugmentOp::Resample => "resample",
        }
    }

    /// Whether the operation generates with the teacher.
    pub fn needs_teacher(self) -> bool {
        matches!(self, AugmentOp::Infill | AugmentOp::Paraphrase | AugmentOp::Backtranslate | AugmentOp::Resample)
    }

    /// The teacher operations' names, for messages.
    pub fn teacher_ops() -> String {
        Self::ALL.iter().filter(|o| o.needs_teacher()).map(|o| o.name()).collect::<Vec<_>>().join(", ")
    }
}

impl std::str::FromStr for AugmentOp {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<AugmentOp> {
        AugmentOp::ALL.into_iter().find(|o| o.name() == s).with_context(|| {
            format!("unknown op `{s}` (ops: {})", AugmentOp::ALL.map(|o| o.name()).join(", "))
        })
    }
}

impl std::fmt::Display for AugmentOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Prompt templates of paraphrase and back-translation, each containing `{text}`.
#[derive(Clone, Debug)]
pub struct Templates {
    pub paraphrase: String,
    pub to_pivot: String,
    pub from_pivot: String,
}

impl Templates {
    /// Reads a JSON object with `paraphrase`, `to_pivot` and `from_pivot`.
    pub fn load(path: &Path) -> Result<Templates> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let t: Value = serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?;
        let get = |k: &str| -> Result<String> {
            match t.get(k).and_then(Value::as_str) {
                Some(s) if s.contains("{text}") => Ok(s.to_string()),
                _ => bail!("{}: `{k}` must be a string containing {{text}}", path.display()),
            }
        };
        Ok(Templates { paraphrase: get("paraphrase")?, to_pivot: get("to_pivot")?, from_pivot: get("from_pivot")? })
    }
}

#[derive(Clone, Debug)]
pub struct AugmentOptions {
    pub ops: Vec<AugmentOp>,
    /// New records per input record and operation (resample: per temperature).
    pub per_record: usize,
    /// Fraction of the words an operation touches.
    pub ratio: f64,
    /// Fraction of input records that get augmented (chosen by the seed).
    pub fraction: f64,
    pub mask_token: String,
    /// Needed by paraphrase and backtranslate.
    pub templates: Option<Templates>,
    /// Sampling temperature of infill, paraphrase and backtranslate (0 = greedy).
    pub temperature: f64,
    /// Temperatures for resample.
    pub temperatures: Vec<f64>,
    pub max_new_tokens: usize,
    pub seed: u64,
    pub batch_size: usize,
    /// Recorded in resampled records' `teacher` field.
    pub teacher_name: Option<String>,
    /// The block of the input's records this run augments (seeds stay those of the whole file).
    pub shard: Shard,
}

impl AugmentOptions {
    pub fn validate(&self) -> Result<()> {
        ensure!(self.ratio > 0.0 && self.ratio <= 1.0, "--ratio must be in (0, 1]");
        ensure!((0.0..=1.0).contains(&self.fraction), "--fraction must be in [0, 1]");
        ensure!(!self.temperatures.is_empty(), "--temperatures must name at least one temperature");
        Ok(())
    }

    pub fn needs_teacher(&self) -> bool {
        self.ops.iter().any(|o| o.needs_teacher())
    }

    pub fn needs_templates(&self) -> bool {
        self.ops.iter().any(|o| matches!(o, AugmentOp::Paraphrase | AugmentOp::Backtranslate))
    }
}

/// The teacher of teacher operations: any [`Teacher`], with the tokenizer its prompts are
/// encoded with and its end-of-sequence ids. Its generations go to a journal, numbered in
/// the order they are asked for, so a resumed run takes finished ones from it.
pub struct AugmentTeacher<'a> {
    teacher: &'a dyn Teacher,
    tok: &'a Tok,
    eos: Vec<i64>,
    journal: RefCell<Journal>,
    /// Generations asked for so far (the journal index of the next one).
    next: Cell<usize>,
}

impl AugmentOptions {
    /// The journal's identity of a run: the input's checksum and every setting that changes
    /// the teacher's generations.
    pub fn fingerprint(&self, data: &Path) -> Result<Value> {
        Ok(json!({
            "stage": "kd-augment",
            "data": file_fingerprint(data)?,
            "ops": self.ops.iter().map(|o| o.name()).collect::<Vec<_>>(),
            "per_record": self.per_record,
            "ratio": self.ratio,
            "fraction": self.fraction,
            "templates": self.templates.as_ref().map(|t| [&t.paraphrase, &t.to_pivot, &t.from_pivot]),
            "temperature": self.temperature,
            "temperatures": self.temperatures,
            "max_new_tokens": self.max_new_tokens,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "teacher": self.teacher_name,
            "shard": self.shard.to_string(),
        }))
    }
}

/// One generation: prompt, the row's seeded stream, temperature.
type Job = (String, Stream, f64);

/// Back-translation's second generation draws from its own stream.
fn return_trip(s: Stream) -> Stream {
    match s {
        Stream::Augment { record, op, copy, .. } => Stream::Augment { record, op, copy, return_trip: true },
        other => other,
    }
}

impl<'a> AugmentTeacher<'a> {
    pub fn new(teacher: &'a dyn Teacher, tok: &'a Tok, eos: Vec<i64>, journal: Journal) -> AugmentTeacher<'a> {
        AugmentTeacher { teacher, tok, eos, journal: RefCell::new(journal), next: Cell::new(0) }
    }

    /// The journal, once the output it fed is written (to be finished).
    pub fn into_journal(self) -> Journal {
        self.journal.into_inner()
    }

    /// Completions for the jobs, batched; rows of one batch share a temperature.
    fn complete(&self, jobs: &[Job], o: &AugmentOptions) -> Result<Vec<String>> {
        let mut out = vec![String::new(); jobs.len()];
        let mut journal = self.journal.borrow_mut();
        let restored = journal.restored().len();
        let base = self.next.get();
        self.next.set(base + jobs.len());
        let mut progress = Progress::new("augment", jobs.len() as u64);
        let mut order: Vec<usize> = (0..jobs.len()).collect();
        order.sort_by(|&a, &b| jobs[a].2.total_cmp(&jobs[b].2));
        let mut at = base;
        for same_t in order.chunk_by(|&a, &b| jobs[a].2 == jobs[b].2) {
            for batch in same_t.chunks(o.batch_size.max(1)) {
                let first = at;
                at += batch.len();
                if at <= restored {
                    for (pos, &j) in batch.iter().enumerate() {
                        let v: Value = serde_json::from_str(&journal.restored()[first + pos]).context("reading the journal")?;
                        ensure!(v["g"].as_u64() == Some((first + pos) as u64), "the journal's generations are not this run's; remove it to start over");
                        out[j] = v["text"].as_str().context("journal line without `text`")?.to_string();
                    }
                    progress.inc(batch.len() as u64, "");
                    continue;
                }
                ensure!(first >= restored, "the journal ends inside a batch; remove it to start over");
                let prompts: Vec<Vec<i64>> = batch.iter().map(|&j| self.tok.encode(&jobs[j].0, true)).collect::<Result<_>>()?;
                let s = Sampling {
                    max_new_tokens: o.max_new_tokens,
                    temperature: jobs[batch[0]].2,
                    top_k: None,
                    top_p: None,
                    eos: self.eos.clone(),
                    pad: 0,
                    stop: vec![],
                };
                let mut rngs: Vec<SplitMix64> = batch.iter().map(|&j| stream(o.seed, jobs[j].1)).collect();
                for (pos, (&j, ids)) in batch.iter().zip(self.teacher.generate(&prompts, &s, &mut rngs, &|_| false)?).enumerate() {
                    out[j] = self.tok.decode(&ids, true)?;
                    journal.push(json!({"g": first + pos, "text": out[j]}).to_string());
                }
                progress.inc(batch.len() as u64, "");
                if journal.due() {
                    journal.commit(None)?;
                }
            }
        }
        progress.finish();
        Ok(out)
    }
}

/// The field an operation rewrites: `text`, else `completion`, else `prompt`.
fn target_field(rec: &Record) -> Option<&'static str> {
    ["text", "completion", "prompt"].into_iter().find(|k| matches!(rec.get(*k), Some(Value::String(_))))
}

/// A derived record: the parent's fields minus those that described the old text.
fn derive(parent: &Record, op: &str, k: usize, field: &str, text: String) -> Record {
    let mut r = parent.clone();
    for stale in ["prompt_ids", "completion_ids", "teacher_logits", "scores", "hard_tokens"] {
        r.remove(stale);
    }
    r.insert("id".into(), json!(format!("{}#{op}{k}", id_of(parent))));
    r.insert("parent".into(), json!(id_of(parent)));
    r.insert("source".into(), json!(format!("augment:{op}")));
    r.insert(field.into(), json!(text));
    r
}

/// The first line of a generation, trimmed (templates ask for one line).
fn first_line(s: &str) -> String {
    s.trim_start().lines().next().unwrap_or("").trim().to_string()
}

/// The seeded stream of copy `k` of operation `op_idx` on record `rec_idx`.
fn key(record: usize, op: usize, copy: usize) -> Stream {
    Stream::Augment { record, op, copy, return_trip: false }
}

/// What a teacher job becomes once generated.
enum Pending {
    /// Infill: keep the first `words` generated words between prefix and suffix.
    Infill { prefix: String, words: usize, suffix: String },
    /// Paraphrase / back-translation: the first line of the output.
    Line,
    /// Resample: the whole completion, at this temperature.
    Completion { temperature: f64 },
}

/// kd-augment's summary (kd-merge builds a joined run's with the same function).
pub fn summary_value(input: usize, originals: usize, new: usize, ops: &[&str]) -> Value {
    json!({"stage": "kd-augment", "input": input, "originals": originals, "new": new, "ops": ops})
}

/// Writes kd-augment's output: the originals of this run's block of records (unless
/// `no_originals`), then the new records, and `<out>.summary.json` (a shard's with its
/// manifest, which tells kd-merge where its originals end).
pub fn write_output(
    o: &AugmentOptions,
    records: &[(usize, Record)],
    data: &Path,
    made: Vec<Record>,
    no_originals: bool,
    out_path: &Path,
) -> Result<String> {
    let block = o.shard.range(records.len())?;
    let n_new = made.len();
    let mut out: Vec<Record> = if no_originals { vec![] } else { records[block.clone()].iter().map(|(_, r)| r.clone()).collect() };
    let originals = out.len();
    out.extend(made);
    ensure!(!out.is_empty(), "nothing to write: no records were augmented and --no-originals is set");
    let ops: Vec<&str> = o.ops.iter().map(|op| op.name()).collect();
    let mut summary = summary_value(block.len(), originals, n_new, &ops);
    if o.shard != Shard::WHOLE {
        let mut settings = o.fingerprint(data)?;
        let settings_map = settings.as_object_mut().expect("an object");
        settings_map.remove("shard");
        settings_map.remove("data");
        settings_map.insert("no_originals".into(), json!(no_originals));
        summary["shard"] = o.shard.manifest("kd-augment", data, settings, records.len())?;
        summary["shard"]["originals"] = json!(originals);
    }
    write_json_atomic(&summary_path(out_path), &summary)?;
    write_jsonl(out_path, &out)?;
    Ok(format!("{} new records from {} ({}) -> {}", n_new, block.len(), ops.join(","), out_path.display()))
}

/// New records for `records` (with their line numbers in `source`, for errors), ordered by
/// record, then operation, then copy. Teacher operations need `teacher`.
pub fn augment(records: &[(usize, Record)], source: &Path, o: &AugmentOptions, teacher: Option<&AugmentTeacher>) -> Result<Vec<Record>> {
    o.validate()?;
    if o.needs_teacher() && teacher.is_none() {
        bail!("ops {} need --teacher", AugmentOp::teacher_ops());
    }
    let templates = match (&o.templates, o.needs_templates()) {
        (Some(t), _) => Some(t),
        (None, true) => bail!("paraphrase and backtranslate need prompt templates"),
        (None, false) => None,
    };
    let mut pick = stream(o.seed, Stream::AugmentPick);
    let block = o.shard.range(records.len())?;
    // Drawn for every record of the file, so that a shard chooses as an unsharded run does.
    let chosen: Vec<bool> = records.iter().enumerate().map(|(ri, _)| pick.next_f64() < o.fraction && block.contains(&ri)).collect();
    let mut made: Vec<((usize, usize, usize), Record)> = vec![];
    for (op_idx, &op) in o.ops.iter().enumerate() {
        let mut jobs: Vec<Job> = vec![];
        let mut pending: Vec<(usize, usize, &str, Pending)> = vec![]; // record, copy, field, what
        for (ri, (line, rec)) in records.iter().enumerate() {
            if !chosen[ri] {
                continue;
            }
            let Some(field) = target_field(rec) else {
                bail!("{}:{line}: record `{}` has no text, completion or prompt to augment", source.display(), id_of(rec));
            };
            let text = str_field(rec, field)?.unwrap_or_default().to_string();
            let copies = if op == AugmentOp::Resample { o.per_record * o.temperatures.len() } else { o.per_record };
            for k in 0..copies {
                let mut rng = stream(o.seed, key(ri, op_idx, k));
                let at = (ri, op_idx, k);
                let op_name = op.name();
                match op {
                    AugmentOp::Delete => made.push((at, derive(rec, op_name, k, field, delete_words(&text, o.ratio, &mut rng)))),
                    AugmentOp::Swap => made.push((at, derive(rec, op_name, k, field, swap_words(&text, o.ratio, &mut rng)))),
                    AugmentOp::Mask => made.push((at, derive(rec, op_name, k, field, mask_span(&text, o.ratio, &o.mask_token, &mut rng)))),
                    AugmentOp::Infill => {
                        let (prefix, span, suffix) = split_for_infill(&text, o.ratio, &mut rng);
                        let words = span.split_whitespace().count();
                        jobs.push((prefix.clone(), key(ri, op_idx, k), o.temperature));
                        pending.push((ri, k, field, Pending::Infill { prefix, words, suffix }));
                    }
                    AugmentOp::Paraphrase | AugmentOp::Backtranslate => {
                        let t = templates.expect("checked above");
                        let template = if op == AugmentOp::Paraphrase { &t.paraphrase } else { &t.to_pivot };
                        jobs.push((fill_template(template, &text), key(ri, op_idx, k), o.temperature));
                        pending.push((ri, k, field, Pending::Line));
                    }
                    AugmentOp::Resample => {
                        // Only prompt records can be resampled; text records are left alone.
                        let Some(prompt) = str_field(rec, "prompt")? else { continue };
                        let temperature = o.temperatures[k % o.temperatures.len()];
                        jobs.push((prompt.to_string(), key(ri, op_idx, k), temperature));
                        pending.push((ri, k, "completion", Pending::Completion { temperature }));
                    }
                }
            }
        }
        if jobs.is_empty() {
            continue;
        }
        let g = teacher.expect("checked above");
        let mut outs = g.complete(&jobs, o)?;
        if op == AugmentOp::Backtranslate {
            let from_pivot = &templates.expect("checked above").from_pivot;
            let back: Vec<Job> =
                outs.iter().zip(&jobs).map(|(out, j)| (fill_template(from_pivot, &first_line(out)), return_trip(j.1), j.2)).collect();
            outs = g.complete(&back, o)?;
        }
        for ((ri, k, field, what), out) in pending.into_iter().zip(outs) {
            let rec = &records[ri].1;
            let new = match &what {
                Pending::Infill { prefix, words, suffix } => {
                    let fill: Vec<&str> = out.split_whitespace().take(*words).collect();
                    [prefix.as_str(), &fill.join(" "), suffix.as_str()].iter().filter(|s| !s.is_empty()).copied().collect::<Vec<_>>().join(" ")
                }
                Pending::Line => first_line(&out),
                Pending::Completion { .. } => out,
            };
            let mut r = derive(rec, op.name(), k, field, new);
            if let Pending::Completion { temperature } = what {
                r.insert("teacher".into(), json!({"model": o.teacher_name, "temperature": temperature, "seed": o.seed}));
            }
            made.push(((ri, op_idx, k), r));
        }
    }
    made.sort_by_key(|m| m.0);
    Ok(made.into_iter().map(|m| m.1).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(ops: &[&str]) -> AugmentOptions {
        AugmentOptions {
            ops: ops.iter().map(|s| s.parse().unwrap()).collect(),
            per_record: 2,
            ratio: 0.3,
            fraction: 1.0,
            mask_token: "<mask>".into(),
            templates: None,
            temperature: 0.0,
            temperatures: vec![1.0],
            max_new_tokens: 8,
            seed: 7,
            shard: Shard::WHOLE,
            batch_size: 4,
            teacher_name: None,
        }
    }

    fn record(id: &str, field: &str, text: &str) -> Record {
        let mut r = Record::new();
        r.insert("id".into(), json!(id));
        r.insert(field.into(), json!(text));
        r.insert("scores".into(), json!({"teacher_confidence": 0.5}));
        r
    }

    #[test]
    fn word_ops_derive_tagged_records_in_record_op_copy_order() {
        let recs = vec![(1, record("a", "text", "one two three four five six")), (2, record("b", "completion", "seven eight nine ten"))];
        let made = augment(&recs, Path::new("in.jsonl"), &options(&["swap", "mask"]), None).unwrap();
        let ids: Vec<&str> = made.iter().map(id_of).collect();
        assert_eq!(ids, ["a#swap0", "a#swap1", "a#mask0", "a#mask1", "b#swap0", "b#swap1", "b#mask0", "b#mask1"]);
        for m in &made {
            assert!(m.get("scores").is_none(), "scores described the old text");
            assert_eq!(m["source"], json!(format!("augment:{}", if id_of(m).contains("swap") { "swap" } else { "mask" })));
        }
        assert_eq!(made[4]["parent"], json!("b"));
        assert!(made[2]["text"].as_str().unwrap().contains("<mask>"));
        assert!(made[6]["completion"].as_str().unwrap().contains("<mask>"));
        // Reproducible: the same seed gives the same records.
        assert_eq!(made, augment(&recs, Path::new("in.jsonl"), &options(&["swap", "mask"]), None).unwrap());
    }

    #[test]
    fn refusals_name_the_problem() {
        let recs = vec![(3, record("a", "title", "no text field"))];
        let err = augment(&recs, Path::new("in.jsonl"), &options(&["delete"]), None).unwrap_err().to_string();
        assert!(err.contains("in.jsonl:3") && err.contains("no text, completion or prompt"), "{err}");
        let err = augment(&recs, Path::new("in.jsonl"), &options(&["infill"]), None).unwrap_err().to_string();
        assert!(err.contains("need --teacher"), "{err}");
        let err = "shuffle".parse::<AugmentOp>().unwrap_err().to_string();
        assert!(err.contains("unknown op `shuffle`") && err.contains("backtranslate"), "{err}");
    }
}
