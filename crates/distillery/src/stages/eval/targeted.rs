//! Targeted sets: the user's own prompts with reference answers, scored answer by answer.
//! Short references (`answer`, `answers`) give exact match, F1 and contains; a long one
//! (`reference`) gives ROUGE-L; a judge grades either (correct 1, partially 0.5, wrong 0).
//! Answers also go to a JSONL file that `kd-eval --pairwise` reads instead of generating.
use super::judge::{grade, Judge, GRADE_NAMES, GRADE_SCORES};
use super::reference::{best_of, contains_answer, exact_match, token_f1, References};
use super::tasks::rouge_l;
use crate::base::io::write_atomic;
use crate::base::stats::{bootstrap_mean_ci, BOOTSTRAP_SEED};
use crate::data::records::{id_of, read_jsonl, str_field};
use anyhow::{ensure, Context, Result};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::path::Path;

pub struct TargetedRecord {
    pub id: String,
    pub prompt: String,
    pub refs: References,
    /// The record's `category`, if any (scores are also given per category).
    pub category: Option<String>,
}

/// The records of a targeted set; each needs a `prompt` and an `id` (answers files and the
/// pairwise judge match records by id; read_jsonl refuses a repeated one).
pub fn targeted_records(path: &Path, limit: Option<usize>) -> Result<Vec<TargetedRecord>> {
    let mut out = vec![];
    for (i, r) in read_jsonl(path)?.iter().enumerate() {
        let id = id_of(r).to_string();
        let at = || format!("{}: record {} (line {})", path.display(), id, i + 1);
        ensure!(!id.is_empty(), "{}: record on line {} has no `id`", path.display(), i + 1);
        let prompt = str_field(r, "prompt").with_context(at)?.with_context(|| format!("{}: no `prompt`", at()))?.to_string();
        let refs = References::of(r, &id).with_context(|| path.display().to_string())?;
        let category = str_field(r, "category").with_context(at)?.map(String::from);
        out.push(TargetedRecord { id, prompt, refs, category });
        if limit.is_some_and(|n| out.len() >= n) {
            break;
        }
    }
    ensure!(!out.is_empty(), "{}: no records", path.display());
    Ok(out)
}

fn mean_ci(xs: &[f64], b: usize) -> (f64, (f64, f64)) {
    (xs.iter().sum::<f64>() / xs.len().max(1) as f64, bootstrap_mean_ci(xs, b, BOOTSTRAP_SEED))
}

/// Scores `outs` (one answer per record) into the metrics `m` (means with bootstrap
/// intervals over records, and per category) and the items' `targeted` entry; returns the
/// summary line's part.
pub fn targeted_entries(
    m: &mut Map<String, Value>,
    items: &mut Map<String, Value>,
    recs: &[TargetedRecord],
    outs: &[String],
    judge: Option<&Judge>,
    b: usize,
) -> Result<String> {
    let mut rows: Vec<Value> = recs
        .iter()
        .zip(outs)
        .map(|(r, o)| json!({"id": r.id, "prompt": r.prompt, "output": o, "category": r.category}))
        .collect();
    let mut summary = vec![];
    let short: Vec<usize> = (0..recs.len()).filter(|&i| !recs[i].refs.short.is_empty()).collect();
    let mut per_metric: Vec<(&str, Vec<usize>, Vec<f64>)> = vec![];
    if !short.is_empty() {
        for (name, f) in [("exact_match", exact_match as fn(&str, &str) -> f64), ("f1", token_f1), ("contains_answer", contains_answer)] {
            let xs: Vec<f64> = short.iter().map(|&i| best_of(&outs[i], &recs[i].refs.short, f)).collect();
            for (&i, x) in short.iter().zip(&xs) {
                rows[i][name] = json!(x);
            }
            per_metric.push((name, short.clone(), xs));
        }
    }
    let long: Vec<usize> = (0..recs.len()).filter(|&i| recs[i].refs.long.is_some()).collect();
    if !long.is_empty() {
        let xs: Vec<f64> = long.iter().map(|&i| rouge_l(&outs[i], recs[i].refs.long.as_deref().unwrap_or_default())).collect();
        for (&i, x) in long.iter().zip(&xs) {
            rows[i]["rouge_l"] = json!(x);
        }
        per_metric.push(("reference_rouge_l", long, xs));
    }
    if let Some(j) = judge {
        let graded: Vec<usize> = (0..recs.len()).filter(|&i| recs[i].refs.for_judge().is_some()).collect();
        let texts: Vec<(String, String)> = graded.iter().map(|&i| (recs[i].prompt.clone(), recs[i].refs.for_judge().unwrap_or_default())).collect();
        let asks: Vec<(&str, &str, &str)> = graded.iter().zip(&texts).map(|(&i, (q, r))| (q.as_str(), r.as_str(), outs[i].as_str())).collect();
        let readings = grade(j, &asks)?;
        let xs: Vec<f64> = readings.iter().map(|r| GRADE_SCORES[r.pick]).collect();
        let mut counts = [0usize; 3];
        for (&i, r) in graded.iter().zip(&readings) {
            counts[r.pick] += 1;
            rows[i]["judge_grade"] = json!(GRADE_NAMES[r.pick]);
            rows[i]["judge_logprobs"] = json!(r.logprobs);
            rows[i]["judge_raw"] = json!(r.raw);
            rows[i]["judge_prompt_tokens"] = json!(r.prompt_tokens);
        }
        m.insert("judge".into(), json!(j.model.name()));
        m.insert("judge_template".into(), json!(j.template_source));
        m.insert("judge_grade_counts".into(), json!({"correct": counts[0], "partial": counts[1], "wrong": counts[2]}));
        per_metric.push(("judge_grade", graded, xs));
    }
    for (name, idx, xs) in &per_metric {
        let (mean, ci) = mean_ci(xs, b);
        m.insert(format!("targeted_{name}"), json!(mean));
        m.insert(format!("targeted_{name}_ci95"), json!(ci));
        m.insert(format!("targeted_{name}_items"), json!(xs.len()));
        summary.push(format!("{name} {mean:.3}"));
        // Per category: where a model is good and where not.
        let mut by_cat: HashMap<&str, Vec<f64>> = HashMap::new();
        for (&i, &x) in idx.iter().zip(xs) {
            by_cat.entry(recs[i].category.as_deref().unwrap_or("(none)")).or_default().push(x);
        }
        if by_cat.len() > 1 {
            let mut cats = Map::new();
            for (c, v) in by_cat {
                cats.insert(c.to_string(), json!({"mean": v.iter().sum::<f64>() / v.len() as f64, "items": v.len()}));
            }
            m.insert(format!("targeted_{name}_by_category"), Value::Object(cats));
        }
    }
    m.insert("targeted_items".into(), json!(recs.len()));
    items.insert("targeted".into(), json!(rows));
    Ok(format!("targeted ({} prompts): {}", recs.len(), summary.join(", ")))
}

/// Writes `{id, prompt, output}` lines atomically.
pub fn write_answers<'a>(path: &Path, recs: impl Iterator<Item = (&'a str, &'a str)>, outs: &[String]) -> Result<()> {
    let mut text = String::new();
    for ((id, prompt), out) in recs.zip(outs) {
        text += &serde_json::to_string(&json!({"id": id, "prompt": prompt, "output": out}))?;
        text.push('\n');
    }
    write_atomic(path, text.as_bytes())
}

/// Answers by id from a file `--answers-out` wrote (`output`, or `completion`).
pub fn read_answers(path: &Path) -> Result<HashMap<String, String>> {
    let mut out = HashMap::new();
    for (i, r) in read_jsonl(path)?.iter().enumerate() {
        let id = id_of(r).to_string();
        ensure!(!id.is_empty(), "{}: answer on line {} has no `id`", path.display(), i + 1);
        let text = match str_field(r, "output")? {
            Some(t) => t,
            None => str_field(r, "completion")?.with_context(|| format!("{}: answer {id} has no `output` (or `completion`)", path.display()))?,
        };
        ensure!(out.insert(id.clone(), text.to_string()).is_none(), "{}: two answers for {id}", path.display());
    }
    Ok(out)
}
