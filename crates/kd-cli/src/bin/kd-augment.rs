//! kd-augment: new records from existing ones, each tagged `source: augment:<op>` with its
//! `parent`. Word operations (delete, swap, mask) need no model; teacher operations
//! (infill, paraphrase, backtranslate, resample) generate with `--teacher`.
use anyhow::bail;
use clap::Parser;
use distillery::base::journal::Journal;
use distillery::base::lock::OutputLock;
use distillery::data::records::read_jsonl_numbered;
use distillery::data::shard::Shard;
use distillery::stages::augment::{augment, write_output, AugmentOp, AugmentOptions, AugmentTeacher, Templates};
use distillery::teacher::LocalTeacher;
use std::path::PathBuf;

#[derive(Parser)]
#[command(about = "Augment records: word deletion/swap/masking, teacher infilling, paraphrase, back-translation, resampling")]
struct Args {
    #[arg(long)]
    data: PathBuf,
    #[arg(long)]
    out: PathBuf,
    /// Operations: delete, swap, mask, infill, paraphrase, backtranslate, resample.
    #[arg(long, value_delimiter = ',', required = true)]
    ops: Vec<AugmentOp>,
    /// Needed by infill, paraphrase, backtranslate and resample (or --teacher-url).
    #[arg(long, conflicts_with = "teacher_url")]
    teacher: Option<String>,
    /// New records per input record and operation (resample: per temperature).
    #[arg(long, default_value_t = 1)]
    per_record: usize,
    /// Fraction of the words an operation touches.
    #[arg(long, default_value_t = 0.15)]
    ratio: f64,
    /// Fraction of input records that get augmented (chosen by the seed).
    #[arg(long, default_value_t = 1.0)]
    fraction: f64,
    #[arg(long, default_value = "<mask>")]
    mask_token: String,
    /// Prompt templates for paraphrase and back-translation (JSON with `paraphrase`,
    /// `to_pivot`, `from_pivot`, each containing `{text}`).
    #[arg(long, default_value = "pipelines/templates/augment.json")]
    templates: PathBuf,
    /// Sampling temperature of teacher operations (0 = greedy).
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    /// Temperatures for `resample`.
    #[arg(long, value_delimiter = ',', default_value = "0.7,1.3")]
    temperatures: Vec<f64>,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Leave the input records out of the output (by default they come first).
    #[arg(long)]
    no_originals: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Continue an interrupted run from its journal (`<out>.journal/`): finished teacher
    /// generations are not redone, and the output is the same as an uninterrupted run's.
    #[arg(long)]
    resume: bool,
    /// Augment shard I of N (I from 0): the input's I-th contiguous block of N records, with
    /// the seeds of an unsharded run; kd-merge joins the shards.
    #[arg(long, value_name = "I/N")]
    shard: Option<Shard>,
    #[command(flatten)]
    runtime: kd_cli::Runtime,
    #[command(flatten)]
    served: kd_cli::ServedArgs,
}

fn main() {
    kd_cli::run("kd-augment", || {
        let a = Args::parse();
        let mut opts = AugmentOptions {
            ops: a.ops.clone(),
            per_record: a.per_record,
            ratio: a.ratio,
            fraction: a.fraction,
            mask_token: a.mask_token.clone(),
            templates: None,
            temperature: a.temperature,
            temperatures: a.temperatures.clone(),
            max_new_tokens: a.max_new_tokens,
            seed: a.seed,
            batch_size: a.batch_size,
            teacher_name: a.teacher.clone(),
            shard: a.shard.unwrap_or(Shard::WHOLE),
        };
        // Every check that needs no data or model comes before loading either.
        opts.validate()?;
        if opts.needs_teacher() && a.teacher.is_none() && a.served.teacher_url.is_none() {
            bail!("ops {} need --teacher (or --teacher-url)", AugmentOp::teacher_ops());
        }
        if opts.needs_templates() {
            opts.templates = Some(Templates::load(&a.templates)?);
        }
        let _lock = OutputLock::acquire(&a.out)?;
        let numbered = read_jsonl_numbered(&a.data)?;
        opts.shard.range(numbered.len())?;
        let teacher = match &a.teacher {
            Some(t) if opts.needs_teacher() => {
                let (device, kind) = a.runtime.resolve()?;
                let (m, files, tok) = distillery::model::load(t, device, kind)?;
                Some(LocalTeacher::new(m, files, tok)?)
            }
            _ => None,
        };
        let served = if opts.needs_teacher() { a.served.connect(None, false)? } else { None };
        let gen = match (&teacher, &served) {
            (Some(t), _) => Some(AugmentTeacher::new(t, &t.tok, t.special.eos.clone(), Journal::open(&a.out, opts.fingerprint(&a.data)?, a.resume)?)),
            (None, Some(t)) => Some(AugmentTeacher::new(t, &t.tok, t.special.eos.clone(), Journal::open(&a.out, opts.fingerprint(&a.data)?, a.resume)?)),
            (None, None) => None,
        };
        let made = augment(&numbered, &a.data, &opts, gen.as_ref())?;
        let summary = write_output(&opts, &numbered, &a.data, made, a.no_originals, &a.out)?;
        if let Some(g) = gen {
            g.into_journal().finish()?;
        }
        Ok(summary)
    });
}
