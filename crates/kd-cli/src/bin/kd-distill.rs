//! kd-distill: train a student against a teacher (live, or from stored top-k logits) with
//! alpha * CE + beta * KD + gamma_h * L_hidden + gamma_a * L_attn.
use anyhow::Result;
use clap::Parser;
use distillery::cli;
use distillery::distill::{DistillConfig, Trainer};
use distillery::losses::{Divergence, HiddenMetric};
use std::path::PathBuf;

#[path = "../loop_args.rs"]
mod loop_args;

#[derive(Parser)]
#[command(about = "Distil a teacher into a student")]
struct Args {
    /// Teacher model (directory or hub id). With --teacher-logits it is used for evaluation only.
    #[arg(long)]
    teacher: Option<String>,
    /// Student checkpoint to start from (kd-init output).
    #[arg(long)]
    student: String,
    /// Training records (JSONL).
    #[arg(long)]
    data: PathBuf,
    /// Output: the trained student checkpoint plus train_state/, metrics.csv, distill_config.json.
    #[arg(long)]
    out: PathBuf,
    /// Weight of the cross-entropy on the data's tokens.
    #[arg(long, default_value_t = 0.5)]
    alpha: f64,
    /// Weight of the KD divergence.
    #[arg(long, default_value_t = 0.5)]
    beta: f64,
    #[arg(long, default_value_t = 2.0)]
    temperature: f64,
    /// forward-kl, reverse-kl, jsd, skew-kl or tvd.
    #[arg(long, default_value = "forward-kl")]
    divergence: String,
    #[arg(long, default_value_t = 0.5)]
    jsd_beta: f64,
    #[arg(long, default_value_t = 0.1)]
    skew_lambda: f64,
    /// gamma_h: weight of hidden-state matching.
    #[arg(long, default_value_t = 0.0)]
    hidden_weight: f64,
    /// mse, normalized-mse (MSE over the teacher's mean square per token: scale-free) or
    /// cosine (1 - cosine similarity).
    #[arg(long, default_value = "mse")]
    hidden_metric: String,
    /// gamma_a: weight of attention-map matching.
    #[arg(long, default_value_t = 0.0)]
    attn_weight: f64,
    /// uniform (kd-init's map when present), last, or S:T,S:T,...
    #[arg(long, default_value = "uniform")]
    layer_map: String,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    /// Offline mode: stored teacher top-k (kd-generate --store-logits sidecar).
    #[arg(long)]
    teacher_logits: Option<PathBuf>,
    /// standard, or progressive (layer-by-layer hidden matching, then full distillation).
    #[arg(long, default_value = "standard")]
    schedule: String,
    #[arg(long)]
    phase_steps: Option<i64>,
    /// Token rows per chunk of the logit losses; 0 picks as many as fit 16 MiB (CPU) or
    /// 64 MiB (GPU) per fp32 [rows, vocab] tensor, so memory stays flat as the vocabulary grows.
    #[arg(long, default_value_t = 0)]
    chunk: i64,
    #[command(flatten)]
    run: loop_args::LoopArgs,
}

fn main() {
    cli::run("kd-distill", || run(Args::parse()));
}

fn run(a: Args) -> Result<()> {
    let base = a.run.config(a.student, a.data, a.out, a.lr, a.weight_decay);
    let cfg = DistillConfig {
        teacher: a.teacher,
        alpha: a.alpha,
        beta: a.beta,
        temperature: a.temperature,
        divergence: Divergence::parse(&a.divergence, a.jsd_beta, a.skew_lambda)?,
        hidden_weight: a.hidden_weight,
        hidden_metric: match a.hidden_metric.as_str() {
            "mse" => HiddenMetric::Mse,
            "normalized-mse" => HiddenMetric::NormalizedMse,
            "cosine" => HiddenMetric::Cosine,
            other => anyhow::bail!("--hidden-metric must be mse, normalized-mse or cosine, got `{other}`"),
        },
        attn_weight: a.attn_weight,
        layer_map: a.layer_map,
        teacher_logits: a.teacher_logits,
        schedule: a.schedule,
        phase_steps: a.phase_steps,
        chunk: a.chunk,
        ..base
    };
    let mut trainer = Trainer::setup(cfg, a.run.resume)?;
    let s = trainer.train()?;
    let mut line = format!("{} steps, final loss {:.4} (ce {:.4}, kd {:.4}), {:.0} tokens/s", s.steps, s.last.loss, s.last.ce, s.last.kd, s.tokens_per_second);
    if let Some(m) = &s.final_eval {
        line += &format!("; held-out perplexity {:.3}", m.perplexity);
        if let Some(kl) = m.teacher_kl {
            line += &format!(", teacher KL {kl:.4}");
        }
    }
    println!("{line} -> {}", trainer.cfg.out.display());
    Ok(())
}
