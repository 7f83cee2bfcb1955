//! kd-finetune: post-distillation fine-tuning on task data with the task loss alone (CE on
//! completions, no teacher) and a smaller learning rate, through the same engine as
//! kd-distill (accumulation, clipping, evaluation, checkpoints, exact resume).
use anyhow::Result;
use clap::Parser;
use distillery::cli;
use distillery::distill::Trainer;
use std::path::PathBuf;

#[path = "../loop_args.rs"]
mod loop_args;

#[derive(Parser)]
#[command(about = "Fine-tune a (distilled) model on task data with the task loss alone")]
struct Args {
    /// Model to fine-tune (e.g. kd-distill output).
    #[arg(long)]
    model: String,
    /// Task records: `prompt` + `completion` (loss on the completion) or `text`.
    #[arg(long)]
    data: PathBuf,
    #[arg(long)]
    out: PathBuf,
    /// Smaller than distillation's by default: fine-tuning adjusts, it does not relearn.
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    #[command(flatten)]
    run: loop_args::LoopArgs,
}

fn main() {
    cli::run("kd-finetune", || run(Args::parse()));
}

fn run(a: Args) -> Result<()> {
    let cfg = a.run.config(a.model, a.data, a.out, a.lr, a.weight_decay);
    let mut trainer = Trainer::setup(cfg, a.run.resume)?;
    let s = trainer.train()?;
    let mut line = format!("{} steps, final task loss {:.4}", s.steps, s.last.ce);
    if let Some(m) = &s.final_eval {
        line += &format!("; held-out perplexity {:.3}", m.perplexity);
    }
    println!("{line} -> {}", trainer.cfg.out.display());
    Ok(())
}
