//! kd-filter: select a transfer set: teacher scores (and with `--student`, hard-example
//! mining), then length, duplicate, threshold and fraction rules, and a summary.
use anyhow::Result;
use clap::Parser;
use distillery::stages::filter::selection::{Bound, Dedup, Fraction, Rules};
use distillery::stages::filter::{check, run, FilterOptions};
use distillery::teacher::LocalTeacher;
use std::path::PathBuf;

#[derive(Parser)]
#[command(about = "Score records with the teacher (and student) and select a transfer set")]
struct Args {
    /// Teacher model directory or hub id (or --teacher-url).
    #[arg(long, required_unless_present = "teacher_url", conflicts_with = "teacher_url")]
    teacher: Option<String>,
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
    /// Continue an interrupted run from its journal (`<out>.journal/`): records already
    /// scored are not scored again. The selection rules may differ from the first run's.
    #[arg(long)]
    resume: bool,
    /// Score shard I of N (I from 0): the I-th contiguous block of N of the scoring batches.
    /// A shard writes every record of its block with its scores (no selection) and kd-merge
    /// applies the rules to the joined shards.
    #[arg(long, value_name = "I/N")]
    shard: Option<distillery::data::shard::Shard>,
    #[command(flatten)]
    runtime: kd_cli::Runtime,
    /// A served teacher scores with its top-K (--teacher-top-k): the scores are then the
    /// bucketed approximations of docs/FORMATS.md.
    #[command(flatten)]
    served: kd_cli::ServedArgs,
}

fn options(a: &Args) -> Result<FilterOptions> {
    let bounds = a.min.iter().map(|s| Bound::parse(s, true)).chain(a.max.iter().map(|s| Bound::parse(s, false)));
    let rules = Rules {
        min_tokens: a.min_tokens,
        max_tokens: a.max_tokens,
        dedup: Dedup::parse(&a.dedup, a.near_threshold)?,
        bounds: bounds.collect::<Result<_>>()?,
        fractions: a.select.iter().map(|s| Fraction::parse(s)).collect::<Result<_>>()?,
    };
    Ok(FilterOptions {
        data: a.data.clone(),
        out: a.out.clone(),
        rules,
        summary: a.summary.clone(),
        scored_out: a.scored_out.clone(),
        worst_tokens: a.worst_tokens,
        max_length: a.max_length,
        batch_size: a.batch_size,
        student_name: a.student.clone(),
        resume: a.resume,
        shard: a.shard.unwrap_or(distillery::data::shard::Shard::WHOLE),
    })
}

fn main() {
    kd_cli::run("kd-filter", || {
        let a = Args::parse();
        let o = options(&a)?;
        check(&o, a.student.is_some())?;
        let _lock = distillery::base::lock::OutputLock::acquire(&o.out)?;
        // Bad input fails before any model loads.
        let records = distillery::data::records::read_jsonl_numbered(&o.data)?;
        o.shard.batch_block(records.len(), o.batch_size)?;
        let (device, kind) = a.runtime.resolve()?;
        if let Some(t) = a.served.connect(None, true)? {
            let student = a.student.as_deref().map(|s| distillery::model::load(s, device, kind)).transpose()?;
            return run(&o, &records, &t, &t.tok, student.as_ref().map(|s| &s.0));
        }
        let (model, files, tok) = distillery::model::load(a.teacher.as_deref().unwrap(), device, kind)?;
        let student = a.student.as_deref().map(|s| distillery::model::load(s, device, kind)).transpose()?;
        let teacher = LocalTeacher::new(model, files, tok)?;
        run(&o, &records, &teacher, &teacher.tok, student.as_ref().map(|s| &s.0))
    });
}
