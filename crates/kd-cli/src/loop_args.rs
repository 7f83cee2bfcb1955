//! Training-loop flags shared by kd-distill and kd-finetune, and the configuration they
//! start from (task loss only; kd-distill adds the teacher and its loss terms).
use distillery::distill::DistillConfig;
use distillery::losses::{Divergence, HiddenMetric};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct LoopArgs {
    #[arg(long, default_value_t = 100)]
    pub steps: i64,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Final learning rate of the cosine decay, as a fraction of --lr.
    #[arg(long, default_value_t = 0.1)]
    pub min_lr_ratio: f64,
    #[arg(long, default_value_t = 10)]
    pub warmup: i64,
    /// Global gradient-norm clip (0 disables).
    #[arg(long, default_value_t = 1.0)]
    pub clip: f64,
    /// Count prompt tokens in the losses too.
    #[arg(long)]
    pub include_prompt_loss: bool,
    /// Held-out records: perplexity (and teacher KL) every --eval-every steps and at the end.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub eval_every: i64,
    /// Checkpoint every N steps (and at the end) into <out>/train_state.
    #[arg(long, default_value_t = 0)]
    pub save_every: i64,
    /// A metrics.csv row every N steps.
    #[arg(long, default_value_t = 1)]
    pub log_every: i64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Compute precision: auto (bf16 autocast on CUDA, f32 on CPU), f32, bf16, f16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// Continue from <out>/train_state.
    #[arg(long)]
    pub resume: bool,
}

impl LoopArgs {
    /// A task-loss-only configuration (alpha = 1, no teacher).
    pub fn config(&self, student: String, data: PathBuf, out: PathBuf, lr: f64, weight_decay: f64) -> DistillConfig {
        DistillConfig {
            teacher: None,
            student,
            data,
            out,
            steps: self.steps,
            alpha: 1.0,
            beta: 0.0,
            temperature: 1.0,
            divergence: Divergence::ForwardKl,
            hidden_weight: 0.0,
            hidden_metric: HiddenMetric::Mse,
            attn_weight: 0.0,
            layer_map: "uniform".into(),
            batch_size: self.batch_size,
            grad_accum: self.grad_accum,
            seq_len: self.seq_len,
            lr,
            min_lr_ratio: self.min_lr_ratio,
            warmup: self.warmup,
            weight_decay,
            clip: self.clip,
            eval_data: self.eval_data.clone(),
            eval_every: self.eval_every,
            save_every: self.save_every,
            log_every: self.log_every,
            teacher_logits: None,
            schedule: "standard".into(),
            phase_steps: None,
            include_prompt_loss: self.include_prompt_loss,
            chunk: 0,
            seed: self.seed,
            device: self.device.clone(),
            dtype: self.dtype.clone(),
        }
    }
}
