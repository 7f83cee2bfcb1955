//! kd-filter: select a transfer set. Scores every record with the teacher (confidence,
//! log-probability, entropy) and, with a student, the student's distance from the teacher
//! (KL, cross-entropy gap, worst tokens: hard-example mining); then keeps records by length,
//! duplicates, thresholds and top/bottom fractions, and writes a summary.
pub mod scoring;
pub mod selection;

use crate::base::io::{file_fingerprint, write_json_atomic};
use crate::base::journal::Journal;
use crate::data::encode::{tokenize_all, Layout};
use crate::data::records::{full_text, write_jsonl, Record};
use crate::model::causal_lm::CausalLm;
use crate::model::tokenizer::Tok;
use crate::teacher::Teacher;
use anyhow::{bail, ensure, Result};
use scoring::{score, Scored};
use selection::{histogram, score_value, select, Outcome, Rules, SCORE_NAMES};
use crate::data::shard::Shard;
use serde_json::{json, Map, Value};
use std::path::PathBuf;

pub struct FilterOptions {
    pub data: PathBuf,
    pub out: PathBuf,
    pub rules: Rules,
    pub summary: Option<PathBuf>,
    pub scored_out: Option<PathBuf>,
    pub worst_tokens: usize,
    pub max_length: usize,
    pub batch_size: usize,
    /// The student's name for the summary (the model itself is passed to [`run`]).
    pub student_name: Option<String>,
    /// Continue from the journal of an interrupted run (`<out>.journal/`).
    pub resume: bool,
    /// The block of --data's scoring batches this run scores. A shard writes every record of its block with
    /// its scores (no selection: duplicates and fractions look at the whole set) and a
    /// manifest; kd-merge joins the shards and applies the rules.
    pub shard: Shard,
}

/// Checks that need no model: run before anything is loaded.
pub fn check(o: &FilterOptions, has_student: bool) -> Result<()> {
    if !has_student && o.rules.needs_student() {
        bail!("kl_teacher_student and ce_gap need --student");
    }
    if o.shard != Shard::WHOLE {
        ensure!(o.summary.is_none(), "--shard writes its summary beside --out, where kd-merge finds it: leave out --summary");
        ensure!(o.scored_out.is_none(), "--shard writes every scored record of its block to --out: leave out --scored-out");
    }
    Ok(())
}

/// Scores, selects and writes; returns the summary line.
pub fn run(o: &FilterOptions, numbered: &[(usize, Record)], teacher: &dyn Teacher, tok: &Tok, student: Option<&CausalLm>) -> Result<String> {
    check(o, student.is_some())?;
    let all = numbered;
    // Scoring batches are runs of records in file order: a shard takes its block of them.
    let block = o.shard.batch_block(all.len(), o.batch_size)?;
    let numbered = &all[block.clone()];
    if let Some(s) = student {
        ensure!(s.config.vocab_size == teacher.vocab_size(), "student and teacher vocabularies differ");
    }
    let seqs: Vec<Scored> = tokenize_all(numbered, &o.data, tok, Layout::Split, Some(o.max_length))?
        .into_iter()
        .map(|t| Scored { from: t.prompt_len, ids: t.ids })
        .collect();
    let texts: Vec<String> = numbered.iter().map(|(_, r)| full_text(r)).collect::<Result<_>>()?;
    let n = numbered.len();
    let fingerprint = json!({
        "stage": "kd-filter",
        "data": file_fingerprint(&o.data)?,
        "teacher": teacher.name(),
        "student": o.student_name,
        "max_length": o.max_length,
        "batch_size": o.batch_size,
        "worst_tokens": o.worst_tokens,
        "shard": o.shard.to_string(),
    });
    let mut journal = Journal::open(&o.out, fingerprint, o.resume)?;
    let all_scores = score(teacher, student, &seqs, o.batch_size, o.worst_tokens, &mut journal)?;
    let value = |i: usize, k: &str| score_value(&all_scores[i], k);
    let lengths: Vec<usize> = seqs.iter().map(|s| s.ids.len()).collect();
    let mut scored: Vec<Record> = Vec::with_capacity(n);
    for (i, (_, rec)) in numbered.iter().enumerate() {
        let mut rec = rec.clone();
        let mut scores = rec.get("scores").and_then(Value::as_object).cloned().unwrap_or_else(Map::new);
        for k in SCORE_NAMES {
            let v = value(i, k);
            if !v.is_nan() {
                scores.insert(k.to_string(), json!(v));
            }
        }
        rec.insert("scores".into(), Value::Object(scores));
        if !all_scores[i].worst.is_empty() {
            let hard: Vec<Value> = all_scores[i]
                .worst
                .iter()
                .map(|&(pos, kl)| json!({"position": pos, "token": tok.decode(&seqs[i].ids[pos..pos + 1], false).unwrap_or_default(), "kl": kl}))
                .collect();
            rec.insert("hard_tokens".into(), Value::Array(hard));
        }
        scored.push(rec);
    }
    if o.shard != Shard::WHOLE {
        let settings = json!({
            "teacher": teacher.name(),
            "student": o.student_name,
            "max_length": o.max_length,
            "worst_tokens": o.worst_tokens,
            "batch_size": o.batch_size,
            "rules": o.rules.to_json(),
        });
        let mut manifest = o.shard.manifest("kd-filter", &o.data, settings, all.len())?;
        // Lengths and scores (as bit patterns, exact) are what the rules read.
        let per_record: Vec<Value> = (0..n)
            .map(|i| json!([lengths[i], SCORE_NAMES.iter().map(|k| value(i, k).to_bits()).collect::<Vec<u64>>()]))
            .collect();
        manifest["per_record"] = json!(per_record);
        manifest["positions"] = json!(block.collect::<Vec<_>>());
        manifest["total"] = json!(all.len());
        let summary = json!({"input": n, "scored": n, "shard": manifest});
        write_json_atomic(&crate::data::shard::summary_path(&o.out), &summary)?;
        write_jsonl(&o.out, &scored)?;
        journal.finish()?;
        return Ok(format!("shard {}: scored {n} records -> {} (kd-merge selects)", o.shard, o.out.display()));
    }
    let outcome = select(&o.rules, &lengths, &texts, value);
    let kept: Vec<Record> = scored.iter().zip(&outcome.kept).filter(|(_, a)| **a).map(|(r, _)| r.clone()).collect();
    let summary = summary_json(&outcome, value, n, teacher.name(), o.student_name.as_deref());
    if let Some(p) = &o.scored_out {
        write_jsonl(p, &scored)?;
    }
    let summary_path = o.summary.clone().unwrap_or_else(|| crate::data::shard::summary_path(&o.out));
    write_json_atomic(&summary_path, &summary)?;
    if kept.is_empty() {
        bail!(
            "every record was filtered out ({} in); loosen the rules (summary in {}; the scores stay in {}, and --resume \
             with other rules reuses them)",
            n,
            summary_path.display(),
            crate::base::journal::journal_dir(&o.out).display()
        );
    }
    write_jsonl(&o.out, &kept)?;
    journal.finish()?;
    Ok(format!("kept {} of {n} records -> {} (removed: {})", kept.len(), o.out.display(), serde_json::to_string(&summary["removed"])?))
}

/// The summary of a selection over `n` scored records: counts, what each rule removed and
/// chose, and the histograms of every score (kd-merge builds a joined run's the same way).
pub fn summary_json(outcome: &Outcome, value: impl Fn(usize, &str) -> f64, n: usize, teacher: &str, student: Option<&str>) -> Value {
    let mut hists = Map::new();
    for k in SCORE_NAMES {
        let vals: Vec<f64> = (0..n).map(|i| value(i, k)).filter(|v| !v.is_nan()).collect();
        if !vals.is_empty() {
            hists.insert(k.to_string(), histogram(&vals));
        }
    }
    json!({
        "input": n,
        "kept": outcome.kept.iter().filter(|&&k| k).count(),
        "removed": outcome.removed,
        "selected_by": outcome.selected_by,
        "histograms": hists,
        "teacher": teacher,
        "student": student,
    })
}
