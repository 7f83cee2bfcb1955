//! kd-eval: everything a distilled model is judged on: perplexity (and with `--teacher`, KL
//! from and top-1 agreement with the teacher), multiple choice and cloze accuracy, ROUGE-L,
//! side-by-side generations, size, latency, throughput and peak memory; 95% intervals
//! beside every mean and a per-item sidecar for kd-report's paired tests.
use clap::Parser;
use distillery::stages::eval::{run, EvalOptions};
use std::path::PathBuf;

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
    #[arg(long, conflicts_with = "teacher_url")]
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
    /// Render the --generate prompts through each model's chat template (instruction models).
    #[arg(long)]
    chat_template: bool,
    /// Markdown file of side-by-side teacher and model completions for the --generate prompts.
    #[arg(long)]
    samples_out: Option<PathBuf>,
    /// Items used per task at most.
    #[arg(long)]
    limit: Option<usize>,
    /// Measure latency (batch 1) and throughput (batch --speed-batch), prompted with the
    /// start of the first evaluated record.
    #[arg(long)]
    speed: bool,
    #[arg(long, default_value_t = 8)]
    speed_batch: usize,
    /// Rounds of the speed measurement after two warm-up runs; the median and the range
    /// over rounds are reported.
    #[arg(long, default_value_t = 5)]
    speed_repeats: usize,
    /// Curve label for kd-report (for example ce, kd, kd-cos, chain, teacher).
    #[arg(long)]
    strategy: Option<String>,
    /// Bootstrap resamples behind the 95% intervals of perplexity, teacher KL, agreement and
    /// ROUGE-L (seed 0: the same inputs give the same intervals).
    #[arg(long, default_value_t = distillery::base::stats::BOOTSTRAP_SAMPLES)]
    bootstrap_samples: usize,
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
    /// Continue the perplexity pass of an interrupted run from its journal
    /// (`<out>.journal/`); the result is the same as an uninterrupted run's.
    #[arg(long)]
    resume: bool,
    /// Evaluate shard I of N (I from 0) of --data: its I-th contiguous block of N records;
    /// kd-merge recombines the shards' token-weighted metrics exactly.
    #[arg(long, value_name = "I/N")]
    shard: Option<distillery::data::shard::Shard>,
    #[command(flatten)]
    runtime: kd_cli::Runtime,
    /// A served teacher (instead of --teacher) gives `teacher_kl` and `top1_agreement`
    /// from its top-K (--teacher-top-k): the bucketed approximations of docs/FORMATS.md.
    #[command(flatten)]
    served: kd_cli::ServedArgs,
}

fn main() {
    kd_cli::run("kd-eval", || {
        let a = Args::parse();
        let (device, kind) = a.runtime.resolve()?;
        let served = a.served.connect(None, true)?;
        run(&EvalOptions {
            model: a.model,
            teacher: a.teacher,
            data: a.data,
            mc: a.mc,
            cloze: a.cloze,
            generate: a.generate,
            samples_out: a.samples_out,
            out: a.out,
            csv: a.csv,
            name: a.name,
            max_new_tokens: a.max_new_tokens,
            chat_template: a.chat_template,
            limit: a.limit,
            speed: a.speed,
            speed_batch: a.speed_batch,
            speed_repeats: a.speed_repeats,
            strategy: a.strategy,
            bootstrap_samples: a.bootstrap_samples,
            batch_size: a.batch_size,
            max_length: a.max_length,
            device,
            kind,
            resume: a.resume,
            shard: a.shard.unwrap_or(distillery::data::shard::Shard::WHOLE),
            served,
        })
    });
}
