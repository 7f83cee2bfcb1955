//! kd-generate: teacher completions for prompts (a transfer set). Greedy at temperature 0,
//! sampling otherwise; batched with a KV cache; deterministic for a given `--seed`.
use anyhow::{ensure, Context, Result};
use clap::Parser;
use distillery::cli;
use distillery::generate::{generate, Sampling};
use distillery::records::{id_of, prompt_of, read_jsonl_numbered, write_jsonl, Record};
use distillery::rng::SplitMix64;
use distillery::runtime::Progress;
use distillery::tokenizer::SpecialTokens;
use serde_json::{json, Value};
use std::path::PathBuf;

#[derive(Parser)]
#[command(about = "Generate teacher completions for JSONL prompts")]
struct Args {
    /// Teacher model directory or hub id.
    #[arg(long)]
    teacher: String,
    /// JSONL records with `prompt` (or `text`, used as the prompt).
    #[arg(long)]
    prompts: PathBuf,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// 0 is greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long)]
    top_k: Option<i64>,
    #[arg(long)]
    top_p: Option<f64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Completions per prompt (ids get a `#sN` suffix and `parent` when above 1).
    #[arg(long, default_value_t = 1)]
    samples: usize,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    #[arg(long, default_value = "auto")]
    device: String,
    #[arg(long, default_value = "auto")]
    dtype: String,
}

fn main() {
    cli::run("kd-generate", || run(Args::parse()));
}

fn run(args: Args) -> Result<()> {
    ensure!(args.temperature >= 0.0, "--temperature must be >= 0");
    ensure!(args.samples >= 1, "--samples must be at least 1");
    ensure!(args.batch_size >= 1, "--batch-size must be at least 1");
    if let Some(p) = args.top_p {
        ensure!(p > 0.0 && p <= 1.0, "--top-p must be in (0, 1]");
    }
    let numbered = read_jsonl_numbered(&args.prompts)?;
    let (device, kind) = cli::device_and_kind(&args.device, &args.dtype)?;
    let (model, files, tok) = cli::load(&args.teacher, device, kind)?;
    let special = SpecialTokens::resolve(&files, &model.config)?;

    // One job per (record, sample); each has its own sampling stream.
    let mut jobs = vec![];
    for (idx, (line, rec)) in numbered.iter().enumerate() {
        let prompt = prompt_of(rec, &args.prompts, *line)?;
        let ids = tok.encode(&prompt, true).with_context(|| format!("{}:{line}", args.prompts.display()))?;
        ensure!(!ids.is_empty(), "{}:{line}: prompt has no tokens", args.prompts.display());
        for s in 0..args.samples {
            jobs.push((idx, s, prompt.clone(), ids.clone()));
        }
    }
    // Similar lengths together keep padding low; outputs are put back in input order.
    let mut order: Vec<usize> = (0..jobs.len()).collect();
    order.sort_by_key(|&j| std::cmp::Reverse(jobs[j].3.len()));
    let sampling = Sampling {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        eos: special.eos.clone(),
        pad: special.pad.unwrap_or(0),
    };
    let mut completions: Vec<Vec<i64>> = vec![vec![]; jobs.len()];
    let mut progress = Progress::new("generate", jobs.len() as u64);
    for chunk in order.chunks(args.batch_size) {
        let prompts: Vec<Vec<i64>> = chunk.iter().map(|&j| jobs[j].3.clone()).collect();
        let mut rngs: Vec<SplitMix64> = chunk
            .iter()
            .map(|&j| SplitMix64::for_key(args.seed, (jobs[j].0 as u64) << 20 | jobs[j].1 as u64))
            .collect();
        let outs = generate(&model, &prompts, &sampling, &mut rngs)?;
        for (&j, out) in chunk.iter().zip(outs) {
            completions[j] = out;
        }
        progress.inc(chunk.len() as u64, "");
    }
    progress.finish();

    let teacher_info = json!({
        "model": args.teacher,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
    });
    let mut out: Vec<Record> = Vec::with_capacity(jobs.len());
    for (j, (idx, s, prompt, ids)) in jobs.iter().enumerate() {
        let mut rec = numbered[*idx].1.clone();
        let parent = id_of(&rec).to_string();
        if args.samples > 1 {
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
        out.push(rec);
    }
    write_jsonl(&args.out, &out)?;
    let tokens: usize = completions.iter().map(Vec::len).sum();
    println!("{}: {} completions, {tokens} new tokens -> {}", args.teacher, out.len(), args.out.display());
    Ok(())
}
