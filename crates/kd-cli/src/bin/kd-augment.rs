//! kd-augment: new records from existing ones, each tagged `source: augment:<op>` with its
//! `parent`. Word operations (delete, swap, mask) need no model; teacher operations
//! (infill, paraphrase, backtranslate, resample) generate with `--teacher`.
use anyhow::{bail, ensure, Result};
use clap::Parser;
use distillery::augment::{augment, AugmentOptions, AugmentTeacher, Templates, TEACHER_OPS};
use distillery::cli;
use distillery::records::{read_jsonl_numbered, write_jsonl, Record};
use distillery::tokenizer::SpecialTokens;
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
    ops: Vec<String>,
    /// Needed by infill, paraphrase, backtranslate and resample.
    #[arg(long)]
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
    #[arg(long, default_value = "auto")]
    device: String,
    #[arg(long, default_value = "auto")]
    dtype: String,
}

fn main() {
    cli::run("kd-augment", || run(Args::parse()));
}

fn run(args: Args) -> Result<()> {
    let mut opts = AugmentOptions {
        ops: args.ops.clone(),
        per_record: args.per_record,
        ratio: args.ratio,
        fraction: args.fraction,
        mask_token: args.mask_token.clone(),
        templates: None,
        temperature: args.temperature,
        temperatures: args.temperatures.clone(),
        max_new_tokens: args.max_new_tokens,
        seed: args.seed,
        batch_size: args.batch_size,
        teacher_name: args.teacher.clone(),
    };
    // Every check that needs no data or model comes before loading either.
    opts.validate()?;
    if opts.needs_teacher() && args.teacher.is_none() {
        bail!("ops {} need --teacher", TEACHER_OPS.join(", "));
    }
    if opts.needs_templates() {
        opts.templates = Some(Templates::load(&args.templates)?);
    }
    let numbered = read_jsonl_numbered(&args.data)?;
    let loaded = match &args.teacher {
        Some(t) if opts.needs_teacher() => {
            let (device, kind) = cli::device_and_kind(&args.device, &args.dtype)?;
            let (m, files, tok) = cli::load(t, device, kind)?;
            let eos = SpecialTokens::resolve(&files, &m.config)?.eos;
            Some((m, tok, eos))
        }
        _ => None,
    };
    let teacher = loaded.as_ref().map(|(model, tok, eos)| AugmentTeacher { model, tok, eos: eos.clone() });
    let made = augment(&numbered, &args.data, &opts, teacher.as_ref())?;
    let n_new = made.len();
    let mut out: Vec<Record> = if args.no_originals { vec![] } else { numbered.iter().map(|(_, r)| r.clone()).collect() };
    out.extend(made);
    ensure!(!out.is_empty(), "nothing to write: no records were augmented and --no-originals is set");
    write_jsonl(&args.out, &out)?;
    println!("{} new records from {} ({}) -> {}", n_new, numbered.len(), args.ops.join(","), args.out.display());
    Ok(())
}
