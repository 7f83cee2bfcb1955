//! kd-filter: select a transfer set. Scores every record with the teacher (confidence,
//! log-probability, entropy) and, with `--student`, the student's distance from the teacher
//! (KL, cross-entropy gap, worst tokens: hard-example mining); then keeps records by length,
//! duplicates, thresholds and top/bottom fractions, and writes a summary.
use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use distillery::cli;
use distillery::io::write_json_atomic;
use distillery::records::{full_text, ids_field, read_jsonl_numbered, text_parts, write_jsonl, Record};
use distillery::scoring::{near_duplicates, score, Scored};
use rayon::prelude::*;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;

#[derive(Parser)]
#[command(about = "Score records with the teacher (and student) and select a transfer set")]
struct Args {
    #[arg(long)]
    teacher: String,
    #[arg(long)]
    data: PathBuf,
    /// Kept records, each with its `scores`.
    #[arg(long)]
    out: PathBuf,
    /// Student for hard-example mining: adds kl_teacher_student, ce_gap and hard_tokens.
    #[arg(long)]
    student: Option<String>,
    /// Keep records whose score is at least the value, e.g. `teacher_confidence=0.4` (repeatable).
    #[arg(long = "min", value_name = "SCORE=VALUE")]
    min: Vec<String>,
    /// Keep records whose score is at most the value, e.g. `teacher_entropy=3` (repeatable).
    #[arg(long = "max", value_name = "SCORE=VALUE")]
    max: Vec<String>,
    /// Keep a top or bottom fraction by a score, e.g. `teacher_confidence:top:0.7`; several
    /// rules keep the union (70% most confident plus 30% hardest: add
    /// `kl_teacher_student:top:0.3`).
    #[arg(long = "select", value_name = "SCORE:top|bottom:FRACTION")]
    select: Vec<String>,
    #[arg(long)]
    min_tokens: Option<usize>,
    #[arg(long)]
    max_tokens: Option<usize>,
    /// none, exact (same text after whitespace normalisation) or near (MinHash on word 3-grams).
    #[arg(long, default_value = "exact")]
    dedup: String,
    /// Estimated Jaccard similarity at which --dedup near drops a record.
    #[arg(long, default_value_t = 0.8)]
    near_threshold: f64,
    /// Summary JSON (default: <out>.summary.json).
    #[arg(long)]
    summary: Option<PathBuf>,
    /// Also write every record (kept or not) with its scores here.
    #[arg(long)]
    scored_out: Option<PathBuf>,
    /// Hard tokens recorded per record with --student.
    #[arg(long, default_value_t = 3)]
    worst_tokens: usize,
    #[arg(long, default_value_t = 512)]
    max_length: usize,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long, default_value = "auto")]
    device: String,
    #[arg(long, default_value = "auto")]
    dtype: String,
}

const SCORES: &[&str] = &["teacher_logprob", "teacher_confidence", "teacher_entropy", "kl_teacher_student", "ce_gap", "tokens"];

fn parse_bound(s: &str) -> Result<(String, f64)> {
    let (k, v) = s.split_once('=').with_context(|| format!("`{s}`: expected SCORE=VALUE"))?;
    ensure!(SCORES.contains(&k), "unknown score `{k}` (scores: {})", SCORES.join(", "));
    Ok((k.to_string(), v.parse().with_context(|| format!("`{s}`: value is not a number"))?))
}

struct Selection {
    score: String,
    top: bool,
    fraction: f64,
}

fn parse_select(s: &str) -> Result<Selection> {
    let parts: Vec<&str> = s.split(':').collect();
    ensure!(parts.len() == 3, "--select `{s}`: expected SCORE:top|bottom:FRACTION");
    ensure!(SCORES.contains(&parts[0]), "unknown score `{}` (scores: {})", parts[0], SCORES.join(", "));
    let top = match parts[1] {
        "top" => true,
        "bottom" => false,
        o => bail!("--select `{s}`: `{o}` must be top or bottom"),
    };
    let fraction: f64 = parts[2].parse().with_context(|| format!("--select `{s}`: bad fraction"))?;
    ensure!((0.0..=1.0).contains(&fraction), "--select `{s}`: fraction must be in [0, 1]");
    Ok(Selection { score: parts[0].into(), top, fraction })
}

fn main() {
    cli::run("kd-filter", || run(Args::parse()));
}

fn histogram(values: &[f64]) -> Value {
    if values.is_empty() {
        return json!(null);
    }
    let (lo, hi) = values.iter().fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let mut counts = [0usize; 10];
    for &v in values {
        let k = if hi > lo { (((v - lo) / (hi - lo)) * 10.0) as usize } else { 0 };
        counts[k.min(9)] += 1;
    }
    json!({"min": lo, "max": hi, "bins": 10, "counts": counts})
}

fn run(args: Args) -> Result<()> {
    let mins: Vec<(String, f64)> = args.min.iter().map(|s| parse_bound(s)).collect::<Result<_>>()?;
    let maxs: Vec<(String, f64)> = args.max.iter().map(|s| parse_bound(s)).collect::<Result<_>>()?;
    let selects: Vec<Selection> = args.select.iter().map(|s| parse_select(s)).collect::<Result<_>>()?;
    ensure!(matches!(args.dedup.as_str(), "none" | "exact" | "near"), "--dedup must be none, exact or near");
    let needs_student = |k: &str| k == "kl_teacher_student" || k == "ce_gap";
    if args.student.is_none()
        && (mins.iter().chain(&maxs).any(|(k, _)| needs_student(k)) || selects.iter().any(|s| needs_student(&s.score)))
    {
        bail!("kl_teacher_student and ce_gap need --student");
    }
    let numbered = read_jsonl_numbered(&args.data)?;
    let (device, kind) = cli::device_and_kind(&args.device, &args.dtype)?;
    let (teacher, _, tok) = cli::load(&args.teacher, device, kind)?;
    let student = match &args.student {
        Some(s) => Some(cli::load(s, device, kind)?.0),
        None => None,
    };
    if let Some(s) = &student {
        ensure!(s.config.vocab_size == teacher.config.vocab_size, "student and teacher vocabularies differ");
    }
    // Tokenize in parallel: stored ids where present, else text (prompt masked).
    let seqs: Vec<Scored> = numbered
        .par_iter()
        .map(|(line, rec)| {
            let at = || format!("{}:{line}", args.data.display());
            let (mut ids, from) = match (ids_field(rec, "prompt_ids").with_context(at)?, ids_field(rec, "completion_ids").with_context(at)?) {
                (Some(p), Some(c)) => {
                    let f = p.len();
                    (p.into_iter().chain(c).collect::<Vec<_>>(), f)
                }
                _ => {
                    let (a, b) = text_parts(rec).with_context(at)?;
                    let mut ids = tok.encode(&a, true)?;
                    match b {
                        Some(c) => {
                            let f = ids.len();
                            ids.extend(tok.encode(&c, false)?);
                            (ids, f)
                        }
                        None => (ids, 1),
                    }
                }
            };
            ids.truncate(args.max_length);
            Ok(Scored { ids, from })
        })
        .collect::<Result<_>>()?;
    let texts: Vec<String> = numbered.iter().map(|(_, r)| full_text(r)).collect::<Result<_>>()?;
    let n = numbered.len();
    let mut removed: BTreeMap<String, usize> = BTreeMap::new();
    let mut alive: Vec<bool> = vec![true; n];
    let mut drop = |alive: &mut Vec<bool>, i: usize, why: &str| {
        if alive[i] {
            alive[i] = false;
            *removed.entry(why.to_string()).or_default() += 1;
        }
    };
    for i in 0..n {
        let len = seqs[i].ids.len();
        if args.min_tokens.is_some_and(|m| len < m) || args.max_tokens.is_some_and(|m| len > m) {
            drop(&mut alive, i, "length");
        }
    }
    if args.dedup != "none" {
        let mut seen = HashSet::new();
        for i in 0..n {
            let norm = texts[i].split_whitespace().collect::<Vec<_>>().join(" ");
            if alive[i] && !seen.insert(norm) {
                drop(&mut alive, i, "exact_duplicate");
            }
        }
    }
    if args.dedup == "near" {
        let idx: Vec<usize> = (0..n).filter(|&i| alive[i]).collect();
        let subset: Vec<String> = idx.iter().map(|&i| texts[i].clone()).collect();
        for j in near_duplicates(&subset, args.near_threshold) {
            drop(&mut alive, idx[j], "near_duplicate");
        }
    }
    let all_scores = score(&teacher, student.as_ref(), &seqs, args.batch_size, args.worst_tokens);
    let value = |i: usize, k: &str| -> f64 {
        let s = &all_scores[i];
        match k {
            "teacher_logprob" => s.teacher_logprob,
            "teacher_confidence" => s.teacher_confidence,
            "teacher_entropy" => s.teacher_entropy,
            "kl_teacher_student" => s.kl_teacher_student.unwrap_or(f64::NAN),
            "ce_gap" => s.ce_gap.unwrap_or(f64::NAN),
            _ => s.tokens as f64,
        }
    };
    for i in 0..n {
        for (k, v) in &mins {
            if alive[i] && !(value(i, k) >= *v) {
                drop(&mut alive, i, &format!("min {k}={v}"));
            }
        }
        for (k, v) in &maxs {
            if alive[i] && !(value(i, k) <= *v) {
                drop(&mut alive, i, &format!("max {k}={v}"));
            }
        }
    }
    let mut selected_by = BTreeMap::new();
    if !selects.is_empty() {
        let pool: Vec<usize> = (0..n).filter(|&i| alive[i]).collect();
        let mut keep = HashSet::new();
        for s in &selects {
            let mut order = pool.clone();
            order.sort_by(|&a, &b| {
                let c = value(a, &s.score).total_cmp(&value(b, &s.score));
                (if s.top { c.reverse() } else { c }).then(a.cmp(&b))
            });
            let take = (s.fraction * pool.len() as f64).round() as usize;
            keep.extend(order.iter().take(take).copied());
            selected_by.insert(format!("{}:{}:{}", s.score, if s.top { "top" } else { "bottom" }, s.fraction), take);
        }
        for i in pool {
            if !keep.contains(&i) {
                drop(&mut alive, i, "not selected");
            }
        }
    }
    let mut scored: Vec<Record> = Vec::with_capacity(n);
    for (i, (_, rec)) in numbered.iter().enumerate() {
        let mut rec = rec.clone();
        let mut scores = rec.get("scores").and_then(Value::as_object).cloned().unwrap_or_else(Map::new);
        for k in SCORES {
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
    let kept: Vec<Record> = scored.iter().zip(&alive).filter(|(_, a)| **a).map(|(r, _)| r.clone()).collect();
    let mut hists = Map::new();
    for k in SCORES {
        let vals: Vec<f64> = (0..n).map(|i| value(i, k)).filter(|v| !v.is_nan()).collect();
        if !vals.is_empty() {
            hists.insert(k.to_string(), histogram(&vals));
        }
    }
    let summary = json!({
        "input": n,
        "kept": kept.len(),
        "removed": removed,
        "selected_by": selected_by,
        "histograms": hists,
        "teacher": args.teacher,
        "student": args.student,
    });
    if let Some(p) = &args.scored_out {
        write_jsonl(p, &scored)?;
    }
    let summary_path = args.summary.clone().unwrap_or_else(|| {
        let name = args.out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        args.out.with_file_name(format!("{name}.summary.json"))
    });
    write_json_atomic(&summary_path, &summary)?;
    if kept.is_empty() {
        bail!("every record was filtered out ({} in); loosen the rules (summary in {})", n, summary_path.display());
    }
    write_jsonl(&args.out, &kept)?;
    println!("kept {} of {n} records -> {} (removed: {})", kept.len(), args.out.display(), serde_json::to_string(&summary["removed"])?);
    Ok(())
}
