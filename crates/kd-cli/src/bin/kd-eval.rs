//! kd-eval: everything a distilled model is judged on. Perplexity (and with `--teacher`,
//! KL from and top-1 agreement with the teacher; definitions in CONTRACT.md), multiple
//! choice and cloze accuracy, ROUGE-L of generations, side-by-side generations for a person
//! to read, size, latency, throughput and peak memory. Writes JSON and appends a CSV row.
use anyhow::{ensure, Result};
use clap::Parser;
use distillery::cli;
use distillery::eval::evaluate;
use distillery::io::{write_atomic, write_json_atomic};
use distillery::records::{read_jsonl, str_field};
use distillery::tasks;
use distillery::tokenizer::SpecialTokens;
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Parser)]
#[command(about = "Evaluate a model: perplexity, teacher agreement, tasks, size and speed")]
struct Args {
    /// Model directory or hub id.
    #[arg(long)]
    model: String,
    /// JSONL records with `text` or `prompt` (+ `completion`) for perplexity.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Where to write the metrics JSON.
    #[arg(long)]
    out: PathBuf,
    /// Teacher model: adds `teacher_kl`, `top1_agreement` and teacher generations.
    #[arg(long)]
    teacher: Option<String>,
    /// Multiple-choice records (`prompt`, `choices`, `label`).
    #[arg(long)]
    mc: Option<PathBuf>,
    /// Cloze records (`prompt`, `completion` = the missing last word).
    #[arg(long)]
    cloze: Option<PathBuf>,
    /// Generative records (`prompt`, reference `completion`): ROUGE-L of greedy completions.
    #[arg(long)]
    generate: Option<PathBuf>,
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// Markdown file of side-by-side teacher and model completions for the --generate prompts.
    #[arg(long)]
    samples_out: Option<PathBuf>,
    /// Items used per task at most.
    #[arg(long)]
    limit: Option<usize>,
    /// Measure latency (batch 1) and throughput (batch --speed-batch).
    #[arg(long)]
    speed: bool,
    #[arg(long, default_value_t = 8)]
    speed_batch: usize,
    /// Append a row to this CSV (one row per evaluated model).
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Label for reports (default: the model argument).
    #[arg(long)]
    name: Option<String>,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Truncate each perplexity record to this many tokens.
    #[arg(long)]
    max_length: Option<usize>,
    #[arg(long, default_value = "auto")]
    device: String,
    #[arg(long, default_value = "auto")]
    dtype: String,
}

fn main() {
    cli::run("kd-eval", || run(Args::parse()));
}

fn limited(path: &Path, limit: Option<usize>) -> Result<Vec<distillery::records::Record>> {
    let mut r = read_jsonl(path)?;
    if let Some(n) = limit {
        r.truncate(n);
    }
    Ok(r)
}

fn run(args: Args) -> Result<()> {
    ensure!(args.batch_size > 0, "--batch-size must be positive");
    ensure!(
        args.data.is_some() || args.mc.is_some() || args.cloze.is_some() || args.generate.is_some() || args.speed,
        "nothing to evaluate: give --data, --mc, --cloze, --generate or --speed"
    );
    // Read every input before the expensive model loads, so bad input fails fast.
    let mc = args.mc.as_deref().map(|p| limited(p, args.limit)).transpose()?;
    let cloze = args.cloze.as_deref().map(|p| limited(p, args.limit)).transpose()?;
    let gen = args.generate.as_deref().map(|p| limited(p, args.limit)).transpose()?;
    let (device, kind) = cli::device_and_kind(&args.device, &args.dtype)?;
    let (model, files, tok) = cli::load(&args.model, device, kind)?;
    let teacher = match &args.teacher {
        Some(t) => Some(cli::load(t, device, kind)?),
        None => None,
    };
    let start = Instant::now();
    let mut m = Map::new();
    let name = args.name.clone().unwrap_or_else(|| args.model.clone());
    m.insert("name".into(), json!(name));
    m.insert("model".into(), json!(args.model));
    m.insert("teacher".into(), json!(args.teacher));
    m.insert("params".into(), json!(model.param_count()));
    let weight_bytes: u64 = files.weights.iter().filter_map(|w| std::fs::metadata(w).ok()).map(|m| m.len()).sum();
    m.insert("bytes_on_disk".into(), json!(weight_bytes));
    m.insert("device".into(), json!(distillery::runtime::device_name(device)));
    m.insert("dtype".into(), json!(distillery::checkpoint::kind_name(kind)));
    let mut summary = vec![];

    if let Some(data) = &args.data {
        let (_, seqs) = cli::read_and_tokenize(data, &tok, args.max_length)?;
        let t0 = Instant::now();
        let e = evaluate(&model, teacher.as_ref().map(|t| &t.0), &seqs, args.batch_size, true)?;
        let secs = t0.elapsed().as_secs_f64();
        m.insert("perplexity_seconds".into(), json!(secs));
        m.insert("perplexity_tokens_per_second".into(), json!((e.tokens + e.records as i64) as f64 / secs.max(1e-9)));
        m.insert("data".into(), json!(data.display().to_string()));
        if let Value::Object(o) = serde_json::to_value(&e)? {
            m.extend(o);
        }
        summary.push(format!("perplexity {:.4} over {} tokens ({} records)", e.perplexity, e.tokens, e.records));
        if let (Some(kl), Some(a)) = (e.teacher_kl, e.top1_agreement) {
            summary.push(format!("teacher KL {kl:.4}, top-1 agreement {:.2}%", 100.0 * a));
        }
    }
    if let Some(recs) = &mc {
        let r = tasks::multiple_choice(&model, &tok, recs, args.batch_size)?;
        m.insert("mc_items".into(), json!(r.items));
        m.insert("mc_accuracy".into(), json!(r.accuracy));
        m.insert("mc_accuracy_norm".into(), json!(r.accuracy_norm));
        summary.push(format!("multiple choice {:.1}% ({} items)", 100.0 * r.accuracy, r.items));
    }
    if let Some(recs) = &cloze {
        let (n, acc) = tasks::cloze(&model, &tok, recs, args.batch_size)?;
        m.insert("cloze_items".into(), json!(n));
        m.insert("cloze_accuracy".into(), json!(acc));
        summary.push(format!("cloze {:.1}% ({n} items)", 100.0 * acc));
    }
    if let Some(recs) = &gen {
        let prompts: Vec<String> = recs.iter().map(|r| Ok(str_field(r, "prompt")?.unwrap_or_default().to_string())).collect::<Result<_>>()?;
        let refs: Vec<String> = recs.iter().map(|r| Ok(str_field(r, "completion")?.unwrap_or_default().to_string())).collect::<Result<_>>()?;
        let eos = SpecialTokens::resolve(&files, &model.config)?.eos;
        let outs = tasks::complete(&model, &tok, &prompts, args.max_new_tokens, &eos, args.batch_size)?;
        let rouge = outs.iter().zip(&refs).map(|(o, r)| tasks::rouge_l(o, r)).sum::<f64>() / outs.len().max(1) as f64;
        m.insert("gen_items".into(), json!(outs.len()));
        m.insert("rouge_l".into(), json!(rouge));
        summary.push(format!("ROUGE-L {rouge:.3}"));
        if let Some(path) = &args.samples_out {
            let teacher_outs = match &teacher {
                Some((t, tf, ttok)) => {
                    let teos = SpecialTokens::resolve(tf, &t.config)?.eos;
                    Some(tasks::complete(t, ttok, &prompts, args.max_new_tokens, &teos, args.batch_size)?)
                }
                None => None,
            };
            let mut md = format!("# Generations: {name}\n\nGreedy, {} new tokens at most.\n\n", args.max_new_tokens);
            for (i, p) in prompts.iter().enumerate() {
                md += &format!("## {}\n\n**Prompt:** {}\n\n", i + 1, p.trim());
                if let Some(t) = &teacher_outs {
                    md += &format!("**Teacher:** {}\n\n", t[i].trim());
                }
                md += &format!("**{name}:** {}\n\n**Reference:** {}\n\n", outs[i].trim(), refs[i].trim());
            }
            write_atomic(path, md.as_bytes())?;
        }
    }
    if args.speed {
        let prompt = tok.encode("In the beginning", true)?;
        let s = tasks::measure_speed(&model, &prompt, 32, args.speed_batch)?;
        if let Value::Object(o) = serde_json::to_value(&s)? {
            m.extend(o);
        }
        summary.push(format!("{:.2} ms/token at batch 1, {:.0} tokens/s at batch {}", s.latency_ms_per_token, s.throughput_tokens_per_s, s.throughput_batch));
    }
    if let Some(rss) = tasks::peak_rss_bytes() {
        m.insert("peak_rss_bytes".into(), json!(rss));
    }
    m.insert("eval_seconds".into(), json!(start.elapsed().as_secs_f64()));
    let value = Value::Object(m);
    write_json_atomic(&args.out, &value)?;
    if let Some(csv) = &args.csv {
        append_csv_row(csv, &value)?;
    }
    println!("{}: {}", name, summary.join(", "));
    Ok(())
}

/// The CSV's columns: a fixed order so rows from different runs line up.
const CSV_COLUMNS: &[&str] = &[
    "name", "model", "params", "bytes_on_disk", "perplexity", "teacher_kl", "top1_agreement", "mc_accuracy",
    "mc_accuracy_norm", "cloze_accuracy", "rouge_l", "latency_ms_per_token", "throughput_tokens_per_s", "peak_rss_bytes",
    "device", "dtype",
];

fn append_csv_row(path: &Path, m: &Value) -> Result<()> {
    let existing = std::fs::read(path).unwrap_or_default();
    let mut w = csv::WriterBuilder::new().from_writer(existing.clone());
    if existing.is_empty() {
        w.write_record(CSV_COLUMNS)?;
    }
    let cell = |k: &str| match &m[k] {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    };
    w.write_record(CSV_COLUMNS.iter().map(|k| cell(k)))?;
    write_atomic(path, &w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?)
}
