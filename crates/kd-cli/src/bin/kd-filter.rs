//! kd-filter: select a transfer set. Scores every record with the teacher (confidence,
//! log-probability, entropy) and, with `--student`, the student's distance from the teacher
//! (KL, cross-entropy gap, worst tokens: hard-example mining); then keeps records by length,
//! duplicates, thresholds and top/bottom fractions, and writes a summary.
use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use distillery::cli;
use distillery::io::write_json_atomic;
use distillery::records::{full_text, read_jsonl_numbered, write_jsonl, Record};
use distillery::scoring::{score, Scored};
use distillery::selection::{histogram, score_value, select, Bound, Dedup, Fraction, Rules, SCORE_NAMES};
use rayon::prelude::*;
use serde_json::{json, Map, Value};
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

fn main() {
    cli::run("kd-filter", || run(Args::parse()));
}

fn run(args: Args) -> Result<()> {
    let bounds = args.min.iter().map(|s| Bound::parse(s, true)).chain(args.max.iter().map(|s| Bound::parse(s, false)));
    let rules = Rules {
        min_tokens: args.min_tokens,
        max_tokens: args.max_tokens,
        dedup: Dedup::parse(&args.dedup, args.near_threshold)?,
        bounds: bounds.collect::<Result<_>>()?,
        fractions: args.select.iter().map(|s| Fraction::parse(s)).collect::<Result<_>>()?,
    };
    if args.student.is_none() && rules.needs_student() {
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
            let (prompt, completion) = cli::prompt_completion_ids(rec, &tok).with_context(|| format!("{}:{line}", args.data.display()))?;
            let from = prompt.len();
            let mut ids = [prompt, completion].concat();
            ids.truncate(args.max_length);
            Ok(Scored { ids, from })
        })
        .collect::<Result<_>>()?;
    let texts: Vec<String> = numbered.iter().map(|(_, r)| full_text(r)).collect::<Result<_>>()?;
    let n = numbered.len();
    let all_scores = score(&teacher, student.as_ref(), &seqs, args.batch_size, args.worst_tokens);
    let value = |i: usize, k: &str| score_value(&all_scores[i], k);
    let lengths: Vec<usize> = seqs.iter().map(|s| s.ids.len()).collect();
    let outcome = select(&rules, &lengths, &texts, value);
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
    let kept: Vec<Record> = scored.iter().zip(&outcome.kept).filter(|(_, a)| **a).map(|(r, _)| r.clone()).collect();
    let mut hists = Map::new();
    for k in SCORE_NAMES {
        let vals: Vec<f64> = (0..n).map(|i| value(i, k)).filter(|v| !v.is_nan()).collect();
        if !vals.is_empty() {
            hists.insert(k.to_string(), histogram(&vals));
        }
    }
    let summary = json!({
        "input": n,
        "kept": kept.len(),
        "removed": outcome.removed,
        "selected_by": outcome.selected_by,
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
