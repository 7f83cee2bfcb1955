//! kd-finetune: post-distillation fine-tuning on task data with the task loss alone (CE on
//! completions, no teacher) and a smaller learning rate, through the same engine as
//! kd-distill (accumulation, clipping, evaluation, checkpoints, exact resume).
use anyhow::Result;
use clap::Parser;
use distillery::cli;
use distillery::distill::{DistillConfig, Trainer};
use distillery::losses::{Divergence, HiddenMetric};
use std::path::PathBuf;

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
    #[arg(long, default_value_t = 100)]
    steps: i64,
    /// Smaller than distillation's by default: fine-tuning adjusts, it does not relearn.
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    #[arg(long, default_value_t = 0.1)]
    min_lr_ratio: f64,
    #[arg(long, default_value_t = 10)]
    warmup: i64,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    #[arg(long, default_value_t = 1.0)]
    clip: f64,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    #[arg(long)]
    include_prompt_loss: bool,
    #[arg(long)]
    eval_data: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    eval_every: i64,
    #[arg(long, default_value_t = 0)]
    save_every: i64,
    #[arg(long, default_value_t = 1)]
    log_every: i64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value = "auto")]
    device: String,
    #[arg(long, default_value = "auto")]
    dtype: String,
    #[arg(long)]
    resume: bool,
}

fn main() {
    cli::run("kd-finetune", || run(Args::parse()));
}

fn run(a: Args) -> Result<()> {
    let cfg = DistillConfig {
        teacher: None,
        student: a.model,
        data: a.data,
        out: a.out,
        steps: a.steps,
        alpha: 1.0,
        beta: 0.0,
        temperature: 1.0,
        divergence: Divergence::ForwardKl,
        hidden_weight: 0.0,
        hidden_metric: HiddenMetric::Mse,
        attn_weight: 0.0,
        layer_map: "uniform".into(),
        batch_size: a.batch_size,
        grad_accum: a.grad_accum,
        seq_len: a.seq_len,
        lr: a.lr,
        min_lr_ratio: a.min_lr_ratio,
        warmup: a.warmup,
        weight_decay: a.weight_decay,
        clip: a.clip,
        eval_data: a.eval_data,
        eval_every: a.eval_every,
        save_every: a.save_every,
        log_every: a.log_every,
        teacher_logits: None,
        schedule: "standard".into(),
        phase_steps: None,
        include_prompt_loss: a.include_prompt_loss,
        chunk: 1024,
        seed: a.seed,
        device: a.device,
        dtype: a.dtype,
    };
    let mut trainer = Trainer::setup(cfg, a.resume)?;
    let s = trainer.train()?;
    let mut line = format!("{} steps, final task loss {:.4}", s.steps, s.last.ce);
    if let Some(m) = &s.final_eval {
        line += &format!("; held-out perplexity {:.3}", m.perplexity);
    }
    println!("{line} -> {}", trainer.cfg.out.display());
    Ok(())
}
