//! kd-distill: train a student against a teacher (live, or from stored top-k logits) with
//! alpha * CE + beta * KD + gamma_h * L_hidden + gamma_a * L_attn.
use clap::Parser;
use distillery::train::cross::CrossTokenizer;
use distillery::train::losses::{Divergence, HiddenMetric};
use distillery::train::trainer::{DistillConfig, LayerMap, OnPolicy, OnPolicyEstimator, TrainSchedule, Trainer};
use std::path::PathBuf;

#[derive(Parser)]
#[command(about = "Distil a teacher into a student")]
struct Args {
    /// Teacher model (directory or hub id). With --teacher-logits it is used for evaluation only.
    /// Or --teacher-url: a teacher behind a server, whose top-K (--teacher-top-k) scores every
    /// KD batch, on-policy ones included.
    #[arg(long, conflicts_with = "teacher_url")]
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
    /// The JSD's beta, as TRL's generalized_jsd_loss: 0 is forward KL, 1 reverse KL.
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
    hidden_metric: HiddenMetric,
    /// gamma_a: weight of attention-map matching.
    #[arg(long, default_value_t = 0.0)]
    attn_weight: f64,
    /// uniform (kd-init's map when present), last, or S:T,S:T,...
    #[arg(long, default_value = "uniform")]
    layer_map: LayerMap,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    /// Offline mode: stored teacher top-k (kd-generate --store-logits sidecar).
    #[arg(long)]
    teacher_logits: Option<PathBuf>,
    /// standard, or progressive (layer-by-layer hidden matching, then full distillation).
    #[arg(long, default_value = "standard")]
    schedule: TrainSchedule,
    #[arg(long)]
    phase_steps: Option<i64>,
    /// Token rows per chunk of the logit losses; 0 picks as many as fit 16 MiB (CPU) or
    /// 512 MiB (GPU) per fp32 [rows, vocab] tensor, so memory stays flat as the vocabulary grows.
    #[arg(long, default_value_t = 0)]
    chunk: i64,
    /// On-policy distillation (GKD's lambda): the probability that a micro-batch's completions
    /// are sampled from the current student and scored by the teacher (0: never).
    #[arg(long, default_value_t = 0.0)]
    on_policy: f64,
    /// The other micro-batches use completions the teacher samples on the fly (sequence-level KD).
    #[arg(long)]
    seq_kd: bool,
    /// Sampling temperature of on-policy and --seq-kd completions (0: greedy).
    #[arg(long, default_value_t = 1.0)]
    gen_temperature: f64,
    #[arg(long)]
    gen_top_p: Option<f64>,
    #[arg(long, default_value_t = 64)]
    gen_max_new_tokens: usize,
    /// The loss of on-policy batches: divergence (the chosen --divergence over the teacher's
    /// distribution; a served teacher's top-K and one tail bucket) or sampled-token (the
    /// reverse KL estimated from each sampled token's log-probabilities, student minus
    /// teacher, through the score function: unbiased per token at --gen-temperature 1 without
    /// --gen-top-p; needs only the sampled tokens' teacher log-probabilities).
    #[arg(long, default_value = "divergence")]
    on_policy_estimator: OnPolicyEstimator,
    /// Distil across tokenizers (the student's vocabulary differs from the teacher's): uld
    /// (sorted-probability Wasserstein distance per aligned span of text) or gold (the
    /// divergence on tokens both vocabularies spell the same, ULD on the rest).
    #[arg(long)]
    cross_tokenizer: Option<CrossTokenizer>,
    /// Probabilities per side that ULD compares, largest first.
    #[arg(long, default_value_t = 256)]
    uld_top_k: i64,
    /// (--teacher-tokenizer also names the teacher's tokenizer for stored logits across
    /// tokenizers, --teacher-logits with --cross-tokenizer, when no --teacher model is given.)
    #[command(flatten)]
    served: kd_cli::ServedArgs,
    #[command(flatten)]
    run: kd_cli::LoopArgs,
}

fn main() {
    kd_cli::run("kd-distill", || {
        let a = Args::parse();
        a.run.stop.install(distillery::base::signals::OnSecond::Abort)?;
        let base = a.run.config(a.student, a.data, a.out, a.lr, a.weight_decay);
        let cfg = DistillConfig {
            teacher: a.teacher,
            alpha: a.alpha,
            beta: a.beta,
            temperature: a.temperature,
            divergence: Divergence::parse(&a.divergence, a.jsd_beta, a.skew_lambda)?,
            hidden_weight: a.hidden_weight,
            hidden_metric: a.hidden_metric,
            attn_weight: a.attn_weight,
            layer_map: a.layer_map,
            teacher_logits: a.teacher_logits,
            schedule: a.schedule,
            phase_steps: a.phase_steps,
            chunk: a.chunk,
            on_policy: OnPolicy {
                lambda: a.on_policy,
                seq_kd: a.seq_kd,
                temperature: a.gen_temperature,
                top_p: a.gen_top_p,
                max_new_tokens: a.gen_max_new_tokens,
                estimator: a.on_policy_estimator,
            },
            cross_tokenizer: a.cross_tokenizer,
            uld_top_k: a.uld_top_k,
            teacher_tokenizer: if a.served.teacher_url.is_none() { a.served.teacher_tokenizer.clone() } else { None },
            served_teacher: a.served.settings(),
            ..base
        };
        let mut trainer = Trainer::setup(cfg, a.run.resume)?;
        let s = trainer.train()?;
        Ok(kd_cli::training_summary(&s, &trainer.cfg.out, true))
    });
}
