//! kd-generate: teacher completions for prompts (a transfer set). Greedy at temperature 0,
//! sampling otherwise; batched with a KV cache; deterministic for a given `--seed`.
use anyhow::{ensure, Context, Result};
use clap::Parser;
use distillery::cli;
use distillery::eval::for_each_hidden;
use distillery::generate::{generate_until, Sampling};
use distillery::model::CausalLm;
use distillery::records::{id_of, prompt_of, read_jsonl_numbered, write_jsonl, Record};
use distillery::rng::SplitMix64;
use distillery::runtime::Progress;
use distillery::teacher_logits::{bytes_per_row, sidecar_path, LogitsWriter};
use distillery::tokenizer::{apply_chat_template, chat_template, SpecialTokens, Tok};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

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
    /// Stop a completion once its text contains this string (repeatable); the token that
    /// completes it is kept.
    #[arg(long = "stop")]
    stop: Vec<String>,
    /// Render each prompt as a user turn through the tokenizer's chat template (with the
    /// generation prompt), as transformers' apply_chat_template does.
    #[arg(long)]
    chat_template: bool,
    /// Scoring mode: no generation; store the teacher's top-K (--store-logits) at every
    /// predicted position of existing records (`text`, or `prompt` + `completion`).
    #[arg(long)]
    score: bool,
    /// Generate exactly --max-new-tokens tokens, ignoring EOS (for benchmarks).
    #[arg(long)]
    ignore_eos: bool,
    /// Also store the teacher's top-K log-probabilities at every completion position in
    /// `<out>.logits.safetensors` (kd-distill --teacher-logits reads it).
    #[arg(long)]
    store_logits: Option<i64>,
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
    ensure!(!args.score || args.store_logits.is_some(), "--score stores logits: give --store-logits K");
    let numbered = read_jsonl_numbered(&args.prompts)?;
    let (device, kind) = cli::device_and_kind(&args.device, &args.dtype)?;
    let (model, files, tok) = cli::load(&args.teacher, device, kind)?;
    let special = SpecialTokens::resolve(&files, &model.config)?;
    if args.score {
        return score_records(&args, &numbered, &model, &tok);
    }
    let template = if args.chat_template {
        Some(chat_template(&files)?.with_context(|| format!("--chat-template: model `{}` has no chat template", args.teacher))?)
    } else {
        None
    };

    // One job per (record, sample); each has its own sampling stream.
    let mut jobs = vec![];
    for (idx, (line, rec)) in numbered.iter().enumerate() {
        let prompt = prompt_of(rec, &args.prompts, *line)?;
        let ids = match &template {
            // The rendered template carries its own special tokens.
            Some(t) => tok.encode(&apply_chat_template(&files, t, &prompt)?, false),
            None => tok.encode(&prompt, true),
        }
        .with_context(|| format!("{}:{line}", args.prompts.display()))?;
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
        eos: if args.ignore_eos { vec![] } else { special.eos.clone() },
        pad: special.pad.unwrap_or(0),
    };
    let mut completions: Vec<Vec<i64>> = vec![vec![]; jobs.len()];
    let mut progress = Progress::new("generate", jobs.len() as u64);
    let started = std::time::Instant::now();
    for chunk in order.chunks(args.batch_size) {
        let prompts: Vec<Vec<i64>> = chunk.iter().map(|&j| jobs[j].3.clone()).collect();
        let mut rngs: Vec<SplitMix64> = chunk
            .iter()
            .map(|&j| SplitMix64::for_key(args.seed, (jobs[j].0 as u64) << 20 | jobs[j].1 as u64))
            .collect();
        let stop = |ids: &[i64]| {
            !args.stop.is_empty() && tok.decode(ids, true).is_ok_and(|t| args.stop.iter().any(|s| t.contains(s.as_str())))
        };
        let outs = generate_until(&model, &prompts, &sampling, &mut rngs, &stop)?;
        for (&j, out) in chunk.iter().zip(outs) {
            completions[j] = out;
        }
        progress.inc(chunk.len() as u64, "");
    }
    progress.finish();
    let gen_secs = started.elapsed().as_secs_f64();

    let pointers = match args.store_logits {
        Some(k) => {
            ensure!(k >= 1 && k <= model.config.vocab_size, "--store-logits must be in 1..={}", model.config.vocab_size);
            Some(store_logits(&model, &jobs.iter().map(|j| j.3.clone()).collect::<Vec<_>>(), &completions, k, &args.out, args.batch_size)?)
        }
        None => None,
    };
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
        if let Some(p) = &pointers {
            rec.insert("teacher_logits".into(), p[j].clone());
        }
        out.push(rec);
    }
    // The sidecar was written first: a JSONL whose pointers lead nowhere never exists.
    write_jsonl(&args.out, &out)?;
    let tokens: usize = completions.iter().map(Vec::len).sum();
    println!(
        "{}: {} completions, {tokens} new tokens in {gen_secs:.2}s ({:.1} tokens/s) -> {}",
        args.teacher,
        out.len(),
        tokens as f64 / gen_secs.max(1e-9),
        args.out.display()
    );
    if let Some(k) = args.store_logits {
        println!("teacher logits: top-{k}, {} bytes per token -> {}", bytes_per_row(k), sidecar_path(&args.out).display());
    }
    Ok(())
}

/// The teacher's top-K at every completion position: the temperature-1 distribution each
/// completion token was predicted from, written to the sidecar before the JSONL.
fn store_logits(
    model: &CausalLm,
    prompts: &[Vec<i64>],
    completions: &[Vec<i64>],
    k: i64,
    out: &Path,
    batch: usize,
) -> Result<Vec<Value>> {
    let seqs: Vec<Vec<i64>> = prompts.iter().zip(completions).map(|(p, c)| p.iter().chain(c).copied().collect()).collect();
    let file = sidecar_path(out);
    let file_name = file.file_name().unwrap().to_string_lossy().into_owned();
    let mut writer = LogitsWriter::new(k);
    let mut pointers = vec![Value::Null; seqs.len()];
    for_each_hidden(model, &seqs, batch, |i, h| {
        let (p, c) = (prompts[i].len() as i64, completions[i].len() as i64);
        let mut pointer = writer.push(&model.logits(&h.narrow(0, p - 1, c)));
        pointer["file"] = json!(file_name);
        pointers[i] = pointer;
    });
    writer.write(&file)?;
    Ok(pointers)
}

/// Scoring mode: the teacher's top-K at every predicted position of existing records.
/// Text records get `prompt_ids` (the first token) and `completion_ids` (the rest), so that
/// row `i` predicts `completion_ids[i]` exactly as for generated records.
fn score_records(args: &Args, numbered: &[(usize, Record)], model: &CausalLm, tok: &Tok) -> Result<()> {
    let k = args.store_logits.unwrap();
    ensure!(k >= 1 && k <= model.config.vocab_size, "--store-logits must be in 1..={}", model.config.vocab_size);
    let mut prompts = vec![];
    let mut completions = vec![];
    for (line, rec) in numbered {
        let at = || format!("{}:{line}", args.prompts.display());
        let (p, c) = cli::prompt_completion_ids(rec, tok).with_context(at)?;
        ensure!(!p.is_empty(), "{}: prompt has no tokens", at());
        prompts.push(p);
        completions.push(c);
    }
    let pointers = store_logits(model, &prompts, &completions, k, &args.out, args.batch_size)?;
    let mut out = Vec::with_capacity(numbered.len());
    for (i, (_, rec)) in numbered.iter().enumerate() {
        let mut rec = rec.clone();
        rec.insert("prompt_ids".into(), json!(prompts[i]));
        rec.insert("completion_ids".into(), json!(completions[i]));
        rec.insert("teacher_logits".into(), pointers[i].clone());
        out.push(rec);
    }
    write_jsonl(&args.out, &out)?;
    let rows: usize = completions.iter().map(Vec::len).sum();
    println!(
        "scored {} records, {rows} positions, top-{k} at {} bytes per token -> {}",
        out.len(),
        bytes_per_row(k),
        sidecar_path(&args.out).display()
    );
    Ok(())
}
