//! kd-finetune: post-distillation fine-tuning on task data with the task loss alone (CE on
//! completions, no teacher) and a smaller learning rate, through the same engine as
//! kd-distill (accumulation, clipping, evaluation, checkpoints, exact resume).
use clap::Parser;
use distillery::train::trainer::Trainer;
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
    /// Smaller than distillation's by default: fine-tuning adjusts, it does not relearn.
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    #[command(flatten)]
    run: kd_cli::LoopArgs,
}

fn main() {
    kd_cli::run("kd-finetune", || {
        let a = Args::parse();
        a.run.stop.install(distillery::base::signals::OnSecond::Abort)?;
        let cfg = a.run.config(a.model, a.data, a.out, a.lr, a.weight_decay);
        let mut trainer = Trainer::setup(cfg, a.run.resume)?;
        let s = trainer.train()?;
        Ok(kd_cli::training_summary(&s, &trainer.cfg.out, false))
    });
}
