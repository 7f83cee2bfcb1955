//! kd-eval: perplexity of a model on JSONL records, and with `--teacher` its KL from and
//! top-1 agreement with the teacher (definitions in CONTRACT.md).
use anyhow::Result;
use clap::Parser;
use distillery::cli;
use distillery::eval::evaluate;
use distillery::io::write_json_atomic;
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser)]
#[command(about = "Evaluate a model: perplexity, and KL/agreement against a teacher")]
struct Args {
    /// Model directory or hub id.
    #[arg(long)]
    model: String,
    /// JSONL records with `text` or `prompt` (+ `completion`).
    #[arg(long)]
    data: PathBuf,
    /// Where to write the metrics JSON.
    #[arg(long)]
    out: PathBuf,
    /// Teacher model: adds `teacher_kl` and `top1_agreement`.
    #[arg(long)]
    teacher: Option<String>,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Truncate each record to this many tokens.
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

fn run(args: Args) -> Result<()> {
    anyhow::ensure!(args.batch_size > 0, "--batch-size must be positive");
    let (device, kind) = cli::device_and_kind(&args.device, &args.dtype)?;
    let (model, files, tok) = cli::load(&args.model, device, kind)?;
    let teacher = match &args.teacher {
        Some(t) => Some(cli::load(t, device, kind)?.0),
        None => None,
    };
    let (_, seqs) = cli::read_and_tokenize(&args.data, &tok, args.max_length)?;
    let start = Instant::now();
    let m = evaluate(&model, teacher.as_ref(), &seqs, args.batch_size, true)?;
    let secs = start.elapsed().as_secs_f64();
    let mut out = serde_json::to_value(&m)?;
    let extra = json!({
        "model": args.model,
        "data": args.data.display().to_string(),
        "teacher": args.teacher,
        "params": model.param_count(),
        "bytes_on_disk": files.weights.iter().filter_map(|w| std::fs::metadata(w).ok()).map(|m| m.len()).sum::<u64>(),
        "device": distillery::runtime::device_name(device),
        "dtype": distillery::checkpoint::kind_name(kind),
        "eval_seconds": secs,
        "eval_tokens_per_second": m.tokens as f64 / secs.max(1e-9),
    });
    out.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    write_json_atomic(&args.out, &out)?;
    let mut line = format!("{}: perplexity {:.4} over {} tokens ({} records)", args.model, m.perplexity, m.tokens, m.records);
    if let (Some(kl), Some(a)) = (m.teacher_kl, m.top1_agreement) {
        line += &format!(", teacher KL {kl:.4}, top-1 agreement {:.2}%", 100.0 * a);
    }
    println!("{line}");
    Ok(())
}
