//! The training engine: distillation (alpha * CE + beta * KD + gamma_h * L_hidden +
//! gamma_a * L_attn), its progressive layer-by-layer schedule, and plain task fine-tuning
//! (beta = 0, no teacher) through the same loop.
//!
//! A run is `setup` (load, validate, resume), `train` (steps with accumulation, clipping,
//! evaluation, checkpoints) and `finish` (export the student). The training state (fp32
//! weights, AdamW moments, projections, step) lives in `<out>/train_state/`, apart from the
//! exported `model.safetensors`, and restores bit for bit on CPU.
use crate::base::batch::{pad, PadSide};
use crate::data::align::{cross_examples, CrossExample, TeacherIds};
use crate::data::encode::{read_tokenized, Layout};
use crate::data::records::Record;
use crate::model::token_bytes::TokenBytes;
use crate::train::cross::{chunked_span_loss, CrossTokenizer, CrossWeights, SpanRows, TeacherSide, VocabMap};
use crate::data::examples::{build_examples, Example, Sampler, TrainBatch};
use crate::base::device::add_to_grad;
use crate::model::checkpoint::{load_model, save_pretrained, write_safetensors, ModelFiles};
use crate::stages::eval::metrics::{evaluate, EvalMetrics};
use crate::teacher::served::{sparse_teacher, ServedSettings, ServedTeacher};
use crate::teacher::{LocalTeacher, SparseTeacher, StoredTeacher, Teacher};
use crate::base::io::{ensure_space, sync_dir, write_atomic, write_json_atomic, write_via_temp};
use crate::base::lock::OutputLock;
use crate::base::signals::{signal_name, stop_requested, Stopped};
use crate::train::losses::{
    attention_loss_sum, chunked_forward_kl, chunked_logit_losses_autograd, chunked_sampled_reverse_kl, hidden_loss_sum,
    teacher_target_logprobs, Divergence, HiddenMetric, LogitLossWeights, TeacherRows,
};
use crate::model::causal_lm::{Capture, CausalLm, LayerSet};
use crate::model::InitMode;
use crate::train::optim::{AdamW, Schedule};
use crate::data::records::{id_of, read_jsonl_numbered};
use crate::base::device::{parse_device, parse_dtype};
use crate::base::progress::Progress;
use crate::data::teacher_logits::LogitsReader;
use crate::model::decode::{generate, Sampling};
use crate::model::tokenizer::{SpecialTokens, Tok};
use crate::base::rng::{stream, Stream};
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{nn, Device, Kind, Tensor};

/// Every setting of a run; saved as `distill_config.json` beside the output.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DistillConfig {
    pub teacher: Option<String>,
    pub student: String,
    pub data: PathBuf,
    pub out: PathBuf,
    pub steps: i64,
    pub alpha: f64,
    pub beta: f64,
    pub temperature: f64,
    pub divergence: Divergence,
    pub hidden_weight: f64,
    pub hidden_metric: HiddenMetric,
    pub attn_weight: f64,
    pub layer_map: LayerMap,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub seq_len: usize,
    pub lr: f64,
    pub min_lr_ratio: f64,
    pub warmup: i64,
    pub weight_decay: f64,
    pub clip: f64,
    pub eval_data: Option<PathBuf>,
    pub eval_every: i64,
    pub save_every: i64,
    pub log_every: i64,
    /// Offline mode: the sidecar of stored teacher top-k log-probabilities.
    pub teacher_logits: Option<PathBuf>,
    pub schedule: TrainSchedule,
    /// Steps per progressive phase (default: half the budget spread over the layers).
    pub phase_steps: Option<i64>,
    pub include_prompt_loss: bool,
    /// Token rows per chunk of the logit losses (0: automatic, 16 MiB per fp32 chunk on CPU, 512 MiB on a GPU).
    pub chunk: i64,
    pub seed: u64,
    pub device: String,
    pub dtype: String,
    /// Steps with a non-finite loss or gradient norm that may be skipped (not applied) before
    /// the run stops; 0 stops at the first.
    #[serde(default)]
    pub skip_nonfinite: usize,
    /// Checkpoints kept in `train_state/` (the newest K).
    #[serde(default = "one")]
    pub keep_last: usize,
    /// On-policy distillation (GKD): micro-batches on the student's own samples.
    #[serde(default)]
    pub on_policy: OnPolicy,
    /// Distillation across tokenizers (ULD or GOLD over aligned spans of text); `None`
    /// requires the student to share the teacher's vocabulary.
    #[serde(default)]
    pub cross_tokenizer: Option<CrossTokenizer>,
    /// Sorted probabilities compared per span by ULD (each side's top K).
    #[serde(default = "default_uld_top_k")]
    pub uld_top_k: i64,
    /// The teacher's tokenizer for stored logits across tokenizers when no `teacher` model is
    /// given (a directory, hub id or .gguf).
    #[serde(default)]
    pub teacher_tokenizer: Option<String>,
    /// A teacher behind an inference server (`--teacher-url`) instead of `teacher`: it scores
    /// every KD batch (its top-K, as stored logits would give) and writes `--seq-kd`
    /// completions.
    #[serde(default)]
    pub served_teacher: Option<ServedSettings>,
    /// Recompute each student layer's activations in the backward pass instead of keeping
    /// them (activation checkpointing): one more forward pass of the layers, for activation
    /// memory of one tensor a layer plus one layer's intermediates.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// With `gradient_checkpointing`, recompute only the first N layers; the later ones keep
    /// their activations (memory for speed). `None`: every layer.
    #[serde(default)]
    pub checkpoint_layers: Option<usize>,
}

fn default_uld_top_k() -> i64 {
    256
}

/// On-policy distillation settings (Agarwal et al., GKD; TRL's `GKDTrainer`). Each
/// micro-batch is, with probability `lambda`, replaced by the student's own completions of
/// its prompts, sampled from the current weights; the teacher scores every sampled token and
/// the divergence is taken over completion tokens only, without CE (the student's own tokens
/// are no target). With `seq_kd`, the other micro-batches use completions the teacher samples
/// on the fly instead of the data's.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct OnPolicy {
    pub lambda: f64,
    pub seq_kd: bool,
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub max_new_tokens: usize,
    /// What on-policy batches minimise.
    pub estimator: OnPolicyEstimator,
}

/// The loss of on-policy batches.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum OnPolicyEstimator {
    /// The chosen divergence over the whole distribution (a served teacher's: its top-K and
    /// one tail bucket).
    #[default]
    Divergence,
    /// The reverse KL estimated from the sampled token alone
    /// ([`crate::train::losses::chunked_sampled_reverse_kl`]).
    SampledToken,
}

impl std::str::FromStr for OnPolicyEstimator {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<OnPolicyEstimator> {
        match s {
            "divergence" => Ok(OnPolicyEstimator::Divergence),
            "sampled-token" => Ok(OnPolicyEstimator::SampledToken),
            _ => bail!("--on-policy-estimator `{s}`: expected divergence or sampled-token"),
        }
    }
}

impl Default for OnPolicy {
    fn default() -> OnPolicy {
        OnPolicy { lambda: 0.0, seq_kd: false, temperature: 1.0, top_p: None, max_new_tokens: 64, estimator: OnPolicyEstimator::Divergence }
    }
}

impl OnPolicy {
    /// Whether any micro-batch is sampled during training.
    pub fn samples(&self) -> bool {
        self.lambda > 0.0 || self.seq_kd
    }
}

fn one() -> usize {
    1
}

impl DistillConfig {
    /// Cheap checks before anything is loaded.
    pub fn validate(&self) -> Result<()> {
        ensure!(self.steps > 0, "--steps must be positive");
        ensure!(self.batch_size > 0 && self.grad_accum > 0, "--batch-size and --grad-accum must be positive");
        ensure!(self.seq_len >= 2, "--seq-len must be at least 2");
        ensure!(self.temperature > 0.0, "--temperature must be positive");
        for (name, v) in [("--alpha", self.alpha), ("--beta", self.beta), ("--hidden-weight", self.hidden_weight), ("--attn-weight", self.attn_weight)] {
            ensure!(v >= 0.0 && v.is_finite(), "{name} must be a non-negative number, got {v}");
        }
        ensure!(self.lr > 0.0, "--lr must be positive");
        let op = &self.on_policy;
        let served = self.served_teacher.is_some();
        ensure!((0.0..=1.0).contains(&op.lambda), "--on-policy must be a probability in [0, 1], got {}", op.lambda);
        if served {
            ensure!(self.teacher.is_none(), "--teacher and --teacher-url name two teachers: give one");
            ensure!(
                self.teacher_logits.is_none(),
                "--teacher-url scores every KD batch through the server; --teacher-logits is for a teacher that is not there"
            );
            ensure!(
                self.hidden_weight == 0.0 && self.attn_weight == 0.0 && self.schedule != TrainSchedule::Progressive,
                "hidden/attention matching and the progressive schedule read the teacher's layers, which a server does not return: \
                 they need a local --teacher"
            );
            ensure!(self.cross_tokenizer.is_none(), "--cross-tokenizer with a served teacher is not supported: store its logits with kd-generate first");
        }
        if op.estimator == OnPolicyEstimator::SampledToken {
            ensure!(op.lambda > 0.0, "--on-policy-estimator sampled-token is the loss of on-policy batches: set --on-policy above 0");
        }
        if op.samples() {
            ensure!(
                (self.teacher.is_some() || served) && self.teacher_logits.is_none(),
                "--on-policy and --seq-kd need a live teacher (--teacher or --teacher-url, without --teacher-logits): the teacher \
                 must score, or write, completions that exist only during training, and stored logits cover the data's completions only"
            );
            ensure!(self.beta > 0.0, "--on-policy and --seq-kd train on the KD term: set --beta above 0");
            ensure!(op.max_new_tokens > 0, "--gen-max-new-tokens must be positive");
            ensure!(op.temperature >= 0.0, "--gen-temperature must be 0 (greedy) or positive");
            ensure!(op.top_p.is_none_or(|p| p > 0.0 && p <= 1.0), "--gen-top-p must be in (0, 1]");
            ensure!(self.schedule != TrainSchedule::Progressive, "--on-policy and --seq-kd do not combine with --schedule progressive");
        }
        ensure!(self.chunk >= 0, "--chunk must be 0 (automatic) or positive");
        ensure!(self.keep_last >= 1, "--keep-last must be at least 1");
        let online = self.teacher.is_some() && self.teacher_logits.is_none();
        if self.beta > 0.0 && self.teacher.is_none() && self.teacher_logits.is_none() && !served {
            bail!("--beta > 0 needs a teacher (--teacher or --teacher-url) or stored teacher logits (--teacher-logits)");
        }
        if (self.hidden_weight > 0.0 || self.attn_weight > 0.0 || self.schedule == TrainSchedule::Progressive) && !online {
            bail!("hidden/attention matching and the progressive schedule need a live teacher (--teacher without --teacher-logits)");
        }
        if let Some(kind) = self.cross_tokenizer {
            ensure!(
                online || self.teacher.is_some() || self.teacher_tokenizer.is_some(),
                "--cross-tokenizer {kind} with stored logits needs the teacher's tokenizer: --teacher-tokenizer (or --teacher)"
            );
            ensure!(
                self.hidden_weight == 0.0 && self.attn_weight == 0.0 && self.schedule != TrainSchedule::Progressive,
                "--cross-tokenizer compares output distributions only: hidden/attention matching and the progressive schedule \
                 pair positions, which differ between tokenizers"
            );
            ensure!(!self.on_policy.samples(), "--cross-tokenizer does not combine with --on-policy or --seq-kd yet");
        } else {
            ensure!(self.teacher_tokenizer.is_none(), "--teacher-tokenizer is for stored logits across tokenizers (--cross-tokenizer)");
            ensure!(self.uld_top_k > 0, "--uld-top-k must be positive");
        }
        if self.alpha == 0.0 && self.beta == 0.0 && self.hidden_weight == 0.0 && self.attn_weight == 0.0 {
            bail!("every loss weight is zero; nothing to train");
        }
        Ok(())
    }

    /// Human-readable differences from another config (for resumed runs).
    pub fn differences(&self, other: &DistillConfig) -> Vec<String> {
        let a = serde_json::to_value(self).unwrap();
        let b = serde_json::to_value(other).unwrap();
        let mut out = vec![];
        for (k, v) in a.as_object().unwrap() {
            let w = &b[k];
            if v != w {
                out.push(format!("{k}: {w} -> {v}"));
            }
        }
        out
    }
}

/// Which student layer imitates which teacher layer in intermediate matching.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LayerMap {
    /// kd-init's map when the student has one; else each student layer against the teacher
    /// layer at the same relative depth.
    Uniform,
    /// The last layers only.
    Last,
    /// Explicit 0-based `(student, teacher)` pairs.
    Pairs(Vec<(usize, usize)>),
}

impl std::str::FromStr for LayerMap {
    type Err = anyhow::Error;

    fn from_str(spec: &str) -> Result<LayerMap> {
        Ok(match spec {
            "uniform" => LayerMap::Uniform,
            "last" => LayerMap::Last,
            explicit => LayerMap::Pairs(
                explicit
                    .split(',')
                    .map(|pair| {
                        let (s, t) = pair.split_once(':').with_context(|| format!("--layer-map: `{pair}` is not S:T (or uniform, last)"))?;
                        let s: usize = s.trim().parse().with_context(|| format!("--layer-map: bad student layer in `{pair}`"))?;
                        let t: usize = t.trim().parse().with_context(|| format!("--layer-map: bad teacher layer in `{pair}`"))?;
                        Ok((s, t))
                    })
                    .collect::<Result<_>>()?,
            ),
        })
    }
}

impl std::fmt::Display for LayerMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LayerMap::Uniform => f.write_str("uniform"),
            LayerMap::Last => f.write_str("last"),
            LayerMap::Pairs(p) => f.write_str(&p.iter().map(|(s, t)| format!("{s}:{t}")).collect::<Vec<_>>().join(",")),
        }
    }
}

// Saved as its text form (`uniform`, `last`, `0:1,1:3`), as distill_config.json always had it.
impl Serialize for LayerMap {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for LayerMap {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<LayerMap, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

impl LayerMap {
    /// The `(student, teacher)` pairs for models of these depths.
    pub fn pairs(&self, student_layers: usize, teacher_layers: usize, init_map: Option<Vec<usize>>) -> Result<Vec<(usize, usize)>> {
        Ok(match self {
            LayerMap::Uniform => match init_map.filter(|m| m.len() == student_layers && m.iter().all(|&t| t < teacher_layers)) {
                Some(m) => m.into_iter().enumerate().collect(),
                None => (0..student_layers).map(|s| (s, ((s + 1) * teacher_layers) / student_layers - 1)).collect(),
            },
            LayerMap::Last => vec![(student_layers - 1, teacher_layers - 1)],
            LayerMap::Pairs(pairs) => {
                for &(s, t) in pairs {
                    ensure!(s < student_layers, "--layer-map: student has layers 0..{}", student_layers - 1);
                    ensure!(t < teacher_layers, "--layer-map: teacher has layers 0..{}", teacher_layers - 1);
                }
                pairs.clone()
            }
        })
    }
}

/// Standard training, or progressive: layer-by-layer hidden matching first, then full
/// distillation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainSchedule {
    Standard,
    Progressive,
}

impl std::str::FromStr for TrainSchedule {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<TrainSchedule> {
        match s {
            "standard" => Ok(TrainSchedule::Standard),
            "progressive" => Ok(TrainSchedule::Progressive),
            other => bail!("--schedule must be standard or progressive, got `{other}`"),
        }
    }
}

/// The layer map kd-init recorded, if the student came from kd-init.
fn init_layer_map(student_dir: &Path) -> Option<Vec<usize>> {
    let text = std::fs::read_to_string(student_dir.join("distillery_init.json")).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    v.get("layer_map")?.as_array()?.iter().map(|x| x.as_u64().map(|u| u as usize)).collect()
}

/// One logged step: a row of metrics.csv, written and read back by column name.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StepLog {
    pub step: i64,
    pub phase: String,
    pub lr: f64,
    pub loss: f64,
    pub ce: f64,
    pub kd: f64,
    pub hidden: f64,
    pub attn: f64,
    pub grad_norm: f64,
    pub tokens: i64,
    pub seconds: f64,
    pub eval_perplexity: Option<f64>,
    pub eval_teacher_kl: Option<f64>,
    /// Share of the step's micro-batches on the student's own samples.
    #[serde(default)]
    pub on_policy: f64,
    /// Mean completion tokens per sampled row (student or teacher), 0 without sampling.
    #[serde(default)]
    pub sampled_tokens: f64,
    /// Seconds spent sampling completions in this step.
    #[serde(default)]
    pub sample_seconds: f64,
    /// Seconds the teacher took in this step: its forward passes up to the last hidden
    /// states (its output head runs chunk by chunk inside the loss), or the server's scoring.
    #[serde(default)]
    pub teacher_seconds: f64,
}

pub struct Summary {
    pub steps: i64,
    /// Steps skipped for a non-finite loss or gradient norm (`--skip-nonfinite`), this run and earlier ones.
    pub skipped: usize,
    pub final_eval: Option<EvalMetrics>,
    pub last: StepLog,
    pub tokens_per_second: f64,
}

struct Projections {
    vs: nn::VarStore,
    /// Per matched pair: `[h_teacher, h_student]` weight, or `None` when widths agree.
    weights: Vec<Option<Tensor>>,
}

const STATE_DIR: &str = "train_state";

/// The student in the compute dtype, paired with its fp32 masters by parameter name.
struct ComputeCopy {
    model: CausalLm,
    /// (master, compute) per parameter.
    pairs: Vec<(Tensor, Tensor)>,
}

impl ComputeCopy {
    fn new(master: &CausalLm, kind: Kind) -> ComputeCopy {
        let model = CausalLm::new(master.config.clone(), master.device(), kind, InitMode::ForLoading);
        let copies = model.vs.variables();
        let mut names: Vec<(String, Tensor)> = master.vs.variables().into_iter().collect();
        names.sort_by(|a, b| a.0.cmp(&b.0));
        let pairs = names.into_iter().map(|(n, m)| (m, copies[&n].shallow_clone())).collect();
        let copy = ComputeCopy { model, pairs };
        copy.refresh();
        copy
    }

    /// Casts the current master weights into the copy.
    fn refresh(&self) {
        tch::no_grad(|| {
            for (m, c) in &self.pairs {
                c.shallow_clone().copy_(m);
            }
        });
    }

    /// Adds the copy's gradients to the masters' fp32 gradients and clears the copy's.
    fn move_gradients(&mut self) {
        for (m, c) in &mut self.pairs {
            let g = c.grad();
            if g.defined() {
                add_to_grad(m, &g);
                c.zero_grad();
            }
        }
    }
}

/// Dynamic loss scaling as torch.amp.GradScaler does it: the backward pass is seeded with the
/// loss times `scale`; a step whose gradients overflow is skipped and halves the scale, and
/// `growth_interval` good steps in a row double it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossScaler {
    pub scale: f64,
    pub good_steps: u64,
}

impl LossScaler {
    const INITIAL: f64 = 65536.0;
    const GROWTH_INTERVAL: u64 = 2000;

    fn new() -> LossScaler {
        LossScaler { scale: Self::INITIAL, good_steps: 0 }
    }

    fn overflowed(&mut self) {
        self.scale /= 2.0;
        self.good_steps = 0;
    }

    fn stepped(&mut self) {
        self.good_steps += 1;
        if self.good_steps == Self::GROWTH_INTERVAL {
            self.scale *= 2.0;
            self.good_steps = 0;
        }
    }
}

pub struct Trainer {
    pub cfg: DistillConfig,
    device: Device,
    /// The fp32 master weights the optimizer updates (and checkpoints hold).
    student: CausalLm,
    /// Reduced-precision runs (`--dtype bf16|f16`): the student in the compute dtype, refreshed
    /// from the masters before every step; its gradients are moved into the masters' fp32
    /// gradients after every micro-batch. No autocast: libtorch's CUDA autocast dtype is fp16
    /// and tch cannot set it, so precision is explicit.
    compute_copy: Option<ComputeCopy>,
    /// Dynamic loss scaling, for f16 only (bf16 has fp32's exponent range).
    scaler: Option<LossScaler>,
    /// End-of-sequence ids and the padding id, for sampled (on-policy, --seq-kd) batches.
    special: SpecialTokens,
    student_files: ModelFiles,
    /// The live teacher: online KD, intermediate matching, and the teacher KL of evaluations.
    teacher: Option<LocalTeacher>,
    /// Stored top-k logits for offline KD.
    stored: Option<StoredTeacher>,
    /// A teacher behind a server (`--teacher-url`): its top-K scores every KD batch.
    served: Option<ServedTeacher>,
    /// Seconds the teacher took in the current step (forward passes or server scoring).
    teacher_seconds: f64,
    /// Sampled tokens whose teacher log-probability the server did not give (outside its
    /// top-K in llama-cpp-python's layout without a BOS): left out of the sampled-token estimate.
    estimated_targets: usize,
    /// The teacher side of every example when the tokenizers differ (`--cross-tokenizer`).
    cross: Option<CrossData>,
    examples: Vec<Example>,
    eval_seqs: Vec<Vec<i64>>,
    pairs: Vec<(usize, usize)>,
    proj: Projections,
    opt: AdamW,
    schedule: Schedule,
    start_step: i64,
    /// Each training record's id, for messages about a step's batch.
    record_ids: Vec<String>,
    /// The step of the newest committed checkpoint.
    last_saved: Option<i64>,
    /// Non-finite steps skipped so far (saved with the state).
    skipped: usize,
    _lock: OutputLock,
}

/// Unnormalised loss sums of a step (CE and KD over loss tokens, hidden and attention over
/// valid tokens).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LossSums {
    pub ce: f64,
    pub kd: f64,
    pub hidden: f64,
    pub attn: f64,
}

impl std::ops::AddAssign for LossSums {
    fn add_assign(&mut self, o: LossSums) {
        self.ce += o.ce;
        self.kd += o.kd;
        self.hidden += o.hidden;
        self.attn += o.attn;
    }
}

/// What a step computed before its update.
struct StepWork {
    batches: Vec<TrainBatch>,
    /// Per micro-batch: sampled from the student?
    policy: Vec<bool>,
    sampled: SampleStats,
    n_loss: i64,
    n_valid: i64,
    sums: LossSums,
}

/// What sampling cost in one step.
#[derive(Default)]
struct SampleStats {
    rows: usize,
    tokens: usize,
    seconds: f64,
}

impl SampleStats {
    fn mean_tokens(&self) -> f64 {
        if self.rows == 0 { 0.0 } else { self.tokens as f64 / self.rows as f64 }
    }
}

/// Cross-tokenizer distillation: each example's teacher ids and aligned spans, and the
/// vocabulary map GOLD uses.
struct CrossData {
    examples: Vec<CrossExample>,
    map: Option<VocabMap>,
    /// Width of the teacher's rows (stored rows are spread over it).
    teacher_vocab: i64,
}

/// Evaluation batches hold at least this many sequences: no gradients are kept, so they can
/// be larger than a training micro-batch.
const EVAL_BATCH_MIN: usize = 8;

impl Trainer {
    /// Loads models and data, checks they fit together, and restores state with `resume`.
    pub fn setup(cfg: DistillConfig, resume: bool) -> Result<Trainer> {
        cfg.validate()?;
        let lock = OutputLock::acquire(&cfg.out)?;
        let device = parse_device(&cfg.device)?;
        let compute = parse_dtype(&cfg.dtype, device)?;
        tch::manual_seed(cfg.seed as i64);
        let data_records = read_jsonl_numbered(&cfg.data)?;
        let state_dir = cfg.out.join(STATE_DIR);
        let resuming = resume && state_dir.join("state.json").is_file();
        // The student starts from --student; a resumed run takes its weights from the state.
        let (student, student_files) = load_model(&cfg.student, device, Kind::Float).with_context(|| format!("loading student `{}`", cfg.student))?;
        let tok = Tok::load(&student_files)?;
        if let Some(n) = cfg.checkpoint_layers {
            let layers = student.num_layers();
            ensure!(n <= layers, "--checkpoint-layers {n}: the student has {layers} layers (at most {layers}: all of them recomputed)");
        }
        let special = SpecialTokens::resolve(&student_files, &student.config)?;
        let online = cfg.teacher.is_some() && cfg.teacher_logits.is_none();
        let teacher = match &cfg.teacher {
            Some(t) => {
                let (teacher, tfiles) = load_model(t, device, compute).with_context(|| format!("loading teacher `{t}`"))?;
                let ttok = Tok::load_or_share(&tfiles, &tok, &student_files)?;
                if cfg.cross_tokenizer.is_none() && (teacher.config.vocab_size != student.config.vocab_size || ttok.vocab_size() != tok.vocab_size()) {
                    bail!(
                        "student vocabulary ({} logits, tokenizer {}) does not match the teacher's ({} logits, tokenizer {}); \
                         to distill across tokenizers pass --cross-tokenizer uld or --cross-tokenizer gold",
                        student.config.vocab_size, tok.vocab_size(), teacher.config.vocab_size, ttok.vocab_size()
                    );
                }
                for (_, mut p) in teacher.vs.variables() {
                    let _ = p.requires_grad_(false);
                }
                Some(LocalTeacher::new(teacher, tfiles, ttok)?)
            }
            None => None,
        };
        let served = match &cfg.served_teacher {
            Some(settings) => {
                let t = ServedTeacher::connect(settings.options()?, None, true)?;
                if cfg.on_policy.seq_kd {
                    if let Some(why) = t.caps.engine.cannot_generate() {
                        bail!("--seq-kd samples completions from the served teacher: {why}");
                    }
                }
                ensure!(
                    t.vocab_size() == student.config.vocab_size,
                    "the served teacher's vocabulary ({} from --teacher-tokenizer) does not match the student's ({})",
                    t.vocab_size(),
                    student.config.vocab_size
                );
                Some(t)
            }
            None => None,
        };
        if cfg.on_policy.estimator == OnPolicyEstimator::SampledToken && (cfg.on_policy.temperature != 1.0 || cfg.on_policy.top_p.is_some_and(|p| p < 1.0)) {
            eprintln!(
                "kd-distill: warning: --on-policy-estimator sampled-token is unbiased only for tokens sampled from the student itself \
                 (--gen-temperature 1 without --gen-top-p); these samples come from another distribution, so it is biased"
            );
        }
        let all_sampled = cfg.on_policy.lambda == 1.0 || cfg.on_policy.seq_kd;
        // Across tokenizers both sides read the text: stored ids are some tokenizer's, maybe
        // the teacher's, never both.
        let student_records: Vec<(usize, Record)> = if cfg.cross_tokenizer.is_some() {
            data_records.iter().map(|(l, r)| (*l, r.iter().filter(|(k, _)| !k.ends_with("_ids")).map(|(k, v)| (k.clone(), v.clone())).collect())).collect()
        } else {
            data_records.clone()
        };
        let examples = build_examples(&student_records, &cfg.data, &tok, cfg.seq_len, cfg.include_prompt_loss, cfg.teacher_logits.is_some(), all_sampled)?;
        let cross = match cfg.cross_tokenizer {
            Some(kind) => {
                // The teacher's tokenizer and the width of its rows: the live teacher's, or
                // --teacher-tokenizer's for stored rows.
                let loaded;
                let (t_tok, t_vocab) = match (teacher.as_ref(), &cfg.teacher_tokenizer) {
                    (_, Some(spec)) => {
                        loaded = Tok::load(&crate::teacher::served::tokenizer_files(spec)?)?;
                        (&loaded, loaded.vocab_size() as i64)
                    }
                    (Some(t), None) => (&t.tok, t.model.config.vocab_size),
                    (None, None) => unreachable!("validate() requires a teacher or its tokenizer"),
                };
                let (s_bytes, t_bytes) = (TokenBytes::of(&tok)?, TokenBytes::of(t_tok)?);
                let ids = if cfg.teacher_logits.is_some() { TeacherIds::Stored } else { TeacherIds::Tokenized };
                let (cross_examples, unaligned) = cross_examples(&examples, &data_records, (&tok, &s_bytes), (t_tok, &t_bytes), ids)?;
                if unaligned > 0 {
                    eprintln!(
                        "kd-distill: {unaligned} of {} examples: a tokenizer does not spell the text exactly (a normaliser rewrites it); \
                         they train on CE alone",
                        examples.len()
                    );
                }
                let map = (kind == CrossTokenizer::Gold).then(|| VocabMap::new(&s_bytes, &t_bytes, device));
                Some(CrossData { examples: cross_examples, map, teacher_vocab: t_vocab })
            }
            None => None,
        };
        if cfg.on_policy.samples() {
            let without = examples.iter().filter(|e| e.prompt_len == 0).count();
            ensure!(
                without == 0,
                "{}: {without} of {} training records have no `prompt`; --on-policy and --seq-kd sample completions of prompts",
                cfg.data.display(),
                examples.len()
            );
        }
        let eval_seqs = match &cfg.eval_data {
            Some(p) => {
                let (_, toks) = read_tokenized(p, &tok, Layout::Whole, Some(cfg.seq_len))?;
                toks.into_iter().map(|t| t.ids).collect()
            }
            None => vec![],
        };
        let (ls, lt) = (student.num_layers(), teacher.as_ref().map_or(0, |t| t.model.num_layers()));
        let pairs = if online && (cfg.hidden_weight > 0.0 || cfg.attn_weight > 0.0 || cfg.schedule == TrainSchedule::Progressive) {
            cfg.layer_map.pairs(ls, lt, init_layer_map(Path::new(&cfg.student)))?
        } else {
            vec![]
        };
        if cfg.attn_weight > 0.0 {
            let (hs, ht) = (student.config.num_heads, teacher.as_ref().unwrap().model.config.num_heads);
            ensure!(ht % hs == 0, "attention matching averages teacher heads per student head: {hs} student heads do not divide {ht} teacher heads");
        }
        // Learned projections where widths differ (FitNets); trained with the student.
        let proj_vs = nn::VarStore::new(device);
        let weights = pairs
            .iter()
            .enumerate()
            .map(|(i, _)| {
                let (hs, ht) = (student.config.hidden_size, teacher.as_ref().unwrap().model.config.hidden_size);
                (hs != ht && cfg.hidden_weight > 0.0 || hs != ht && cfg.schedule == TrainSchedule::Progressive).then(|| {
                    let bound = 1.0 / (hs as f64).sqrt();
                    (proj_vs.root() / "proj" / i).var("weight", &[ht, hs], nn::Init::Uniform { lo: -bound, up: bound })
                })
            })
            .collect();
        let proj = Projections { vs: proj_vs, weights };
        let mut params: Vec<(String, Tensor)> = student.vs.variables().into_iter().collect();
        params.extend(proj.vs.variables());
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let mut opt = AdamW::new(params, cfg.weight_decay);
        if cfg.schedule == TrainSchedule::Standard && (cfg.alpha > 0.0 || cfg.beta > 0.0) {
            // The logit losses reach every parameter at every step (the progressive schedule
            // leaves the upper layers without gradients, which AdamW must skip).
            opt.bind_gradients();
        }
        let schedule = Schedule { lr: cfg.lr, warmup: cfg.warmup, total: cfg.steps, min_ratio: cfg.min_lr_ratio };
        let stored = cfg.teacher_logits.as_ref().map(|p| {
            let pointers = data_records.iter().map(|(_, r)| r.get("teacher_logits").cloned().map(|v| (v, 0))).collect();
            StoredTeacher::new(p.display().to_string(), student.config.vocab_size, LogitsReader::with_file(p), pointers)
        });
        let mut trainer = Trainer {
            cfg,
            device,
            compute_copy: (compute != Kind::Float).then(|| ComputeCopy::new(&student, compute)),
            scaler: (compute == Kind::Half).then(LossScaler::new),
            special,
            student,
            student_files,
            teacher,
            stored,
            served,
            teacher_seconds: 0.0,
            estimated_targets: 0,
            cross,
            examples,
            eval_seqs,
            pairs,
            proj,
            opt,
            schedule,
            start_step: 0,
            record_ids: data_records.iter().map(|(_, r)| id_of(r).to_string()).collect(),
            last_saved: None,
            skipped: 0,
            _lock: lock,
        };
        if resuming {
            trainer.restore(&state_dir)?;
        } else if state_dir.exists() && !resume {
            bail!("{} holds the state of an earlier run; add --resume to continue it, or choose another --out", state_dir.display());
        }
        // What setup freed (tokenizer JSON, the parameters' storage before the optimizer's
        // flat buffers, the state read on resume) goes back to the OS.
        crate::base::alloc::release_free_memory();
        Ok(trainer)
    }

    fn restore(&mut self, dir: &Path) -> Result<()> {
        let state: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("state.json"))?)?;
        let saved: DistillConfig = serde_json::from_value(state["config"].clone()).context("reading the saved configuration")?;
        let diffs = self.cfg.differences(&saved);
        if !diffs.is_empty() {
            eprintln!("kd-distill: warning: the resumed run's settings differ from the saved run's: {}", diffs.join("; "));
        }
        // Older states have no `tensors` entry and a fixed file name.
        let file = state["tensors"].as_str().unwrap_or("state.safetensors");
        let tensors: HashMap<String, Tensor> = Tensor::read_safetensors(dir.join(file))?.into_iter().collect();
        tch::no_grad(|| -> Result<()> {
            for (name, p) in self.opt.params() {
                let src = tensors.get(&format!("param.{name}")).with_context(|| format!("training state lacks `param.{name}`"))?;
                p.shallow_clone().copy_(&src.to_device(p.device()));
            }
            Ok(())
        })?;
        let step = state["step"].as_i64().context("state.json: no step")?;
        // A skipped step advances the schedule but not AdamW's own count (older states: equal).
        let opt_step = state["optimizer_step"].as_i64().unwrap_or(step);
        self.opt.load_state(&tensors, opt_step)?;
        self.skipped = state["nonfinite_skipped"].as_u64().unwrap_or(0) as usize;
        if let (Some(sc), Some(saved)) = (self.scaler.as_mut(), state["loss_scale"].as_object()) {
            sc.scale = saved["scale"].as_f64().context("state.json: loss_scale.scale")?;
            sc.good_steps = saved["good_steps"].as_u64().context("state.json: loss_scale.good_steps")?;
        }
        self.start_step = step;
        self.last_saved = Some(step);
        eprintln!("kd-distill: resuming at step {step}");
        Ok(())
    }

    /// Commits a checkpoint of `step`, then exports the student. A failed save leaves the
    /// previous checkpoint as it was, and the error says so.
    fn save_state(&mut self, step: i64) -> Result<()> {
        let dir = self.cfg.out.join(STATE_DIR);
        let intact = match self.last_saved {
            Some(s) => format!("the checkpoint of step {s} in {} is intact and --resume continues from it", dir.display()),
            None => "no earlier checkpoint exists".to_string(),
        };
        let mut tensors: Vec<(String, Tensor)> = self.opt.params().map(|(n, p)| (format!("param.{n}"), p.detach())).collect();
        tensors.extend(self.opt.state_tensors());
        // The new tensors and the export are written while the old files still exist.
        let state_bytes: u64 = tensors.iter().map(|(_, t)| (t.numel() * t.kind().elt_size_in_bytes()) as u64).sum();
        let export_bytes: u64 = self.student.vs.variables().values().map(|t| (t.numel() * t.kind().elt_size_in_bytes()) as u64).sum();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}; {intact}", dir.display()))?;
        let needed = state_bytes + export_bytes;
        ensure_space(&dir, needed + needed / 64 + (64 << 10), &format!("the checkpoint of step {step}"))
            .with_context(|| format!("not saving step {step}; {intact}"))?;
        // One rename commits a checkpoint: the tensors go to a file named by the step, then
        // state.json, which names that file, replaces the old one. A kill at any moment
        // leaves a state.json whose tensors are complete and of its own step.
        let file = format!("state-{step:08}.safetensors");
        let state = json!({
            "step": step,
            "tensors": file,
            "optimizer_step": self.opt.step,
            "nonfinite_skipped": self.skipped,
            "loss_scale": self.scaler.map(|s| json!({"scale": s.scale, "good_steps": s.good_steps})),
            "config": self.cfg,
        });
        let commit = || -> Result<()> {
            write_via_temp(&dir.join(&file), |tmp| write_safetensors(&tensors, tmp))?;
            // Per-step copies of state.json let an older kept checkpoint be resumed by hand.
            write_json_atomic(&dir.join(format!("state-{step:08}.json")), &state)?;
            write_json_atomic(&dir.join("state.json"), &state)?;
            sync_dir(&dir)
        };
        commit().with_context(|| format!("saving the training state of step {step} failed; {intact}"))?;
        self.last_saved = Some(step);
        self.rotate(&dir);
        save_pretrained(&self.student, &self.cfg.out, Some(&self.student_files), &[("distill_config.json", &serde_json::to_value(&self.cfg)?)])
            .with_context(|| format!("exporting the student to {} failed; the training state of step {step} is saved in {}", self.cfg.out.display(), dir.display()))
    }

    /// Keeps the newest `--keep-last` checkpoints (tensors and their state-<step>.json).
    fn rotate(&self, dir: &Path) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        let mut steps: Vec<(i64, String)> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let step = name.strip_prefix("state-")?.split('.').next()?.parse().ok()?;
                Some((step, name))
            })
            .collect();
        let mut kept: Vec<i64> = steps.iter().map(|s| s.0).collect();
        kept.sort_unstable();
        kept.dedup();
        let keep_from = kept.len().saturating_sub(self.cfg.keep_last);
        let keep: std::collections::HashSet<i64> = kept[keep_from..].iter().copied().collect();
        steps.retain(|(s, _)| !keep.contains(s));
        for (_, name) in steps {
            let _ = std::fs::remove_file(dir.join(name));
        }
        // The fixed-name tensors of older releases.
        let _ = std::fs::remove_file(dir.join("state.safetensors"));
    }

    /// The error of a run stopped by `sig` after finishing step `done` (None: before any step).
    fn stopped(&self, sig: i32, done: Option<i64>) -> Stopped {
        let dir = self.cfg.out.join(STATE_DIR);
        let message = match (done, self.last_saved) {
            (Some(d), _) => format!(
                "stopped by {} after step {d} of {}; the training state is saved in {}; run the same command with --resume to continue",
                signal_name(sig), self.cfg.steps, dir.display()
            ),
            (None, Some(s)) => format!("stopped by {} before any step; the checkpoint of step {s} in {} is unchanged", signal_name(sig), dir.display()),
            (None, None) => format!("stopped by {} before any step; nothing to save", signal_name(sig)),
        };
        Stopped { signal: sig, message }
    }

    /// The record ids of a step's micro-batches, for messages.
    fn batch_ids(&self, batches: &[TrainBatch]) -> String {
        let mut ids: Vec<&str> = batches.iter().flat_map(|b| b.examples.iter().map(|&e| self.record_ids[self.examples[e].record].as_str())).collect();
        ids.dedup();
        ids.join(", ")
    }

    /// The phase of a step: progressive phases train the first `depth` student layers on
    /// hidden matching alone; `None` is full distillation.
    fn phase(&self, step: i64) -> Option<usize> {
        if self.cfg.schedule != TrainSchedule::Progressive {
            return None;
        }
        let depths: Vec<usize> = {
            let mut d: Vec<usize> = self.pairs.iter().map(|p| p.0 + 1).collect();
            d.sort();
            d.dedup();
            d
        };
        let per = self.cfg.phase_steps.unwrap_or((self.cfg.steps / 2 / depths.len().max(1) as i64).max(1));
        let k = (step / per) as usize;
        depths.get(k).copied()
    }

    fn micro_batches(&self, sampler: &mut Sampler, step: i64) -> Vec<TrainBatch> {
        let per_step = self.cfg.batch_size * self.cfg.grad_accum;
        (0..self.cfg.grad_accum)
            .map(|m| {
                let base = step as usize * per_step + m * self.cfg.batch_size;
                let which: Vec<usize> = (0..self.cfg.batch_size).map(|j| sampler.at(base + j)).collect();
                TrainBatch::new(&self.examples, &which, self.device)
            })
            .collect()
    }

    /// The stored teacher rows of a micro-batch's loss targets, in batch order.
    fn stored_rows(&self, batch: &TrainBatch) -> Result<SparseTeacher> {
        let stored = self.stored.as_ref().expect("offline mode has stored logits");
        let (mut idx, mut lp, mut tail) = (vec![], vec![], vec![]);
        for &e in &batch.examples {
            let ex = &self.examples[e];
            let (rows, _) = stored.record_rows(ex.record)?;
            let need = ex.loss_targets() as i64;
            ensure!(rows.indices.size()[0] >= need, "stored teacher logits have {} rows, the example needs {need}", rows.indices.size()[0]);
            idx.push(rows.indices.narrow(0, 0, need));
            lp.push(rows.logprobs.narrow(0, 0, need));
            tail.push(rows.tail_logmass.narrow(0, 0, need));
        }
        Ok(SparseTeacher {
            indices: Tensor::cat(&idx, 0).to_device(self.device),
            logprobs: Tensor::cat(&lp, 0).to_device(self.device),
            tail_logmass: Tensor::cat(&tail, 0).to_device(self.device),
        })
    }

    /// A served teacher's rows for a micro-batch's loss targets, in batch order: its top-K
    /// (`--teacher-top-k`) and each target's own log-probability, NaN where the server leaves
    /// it out (the sampled-token estimate then leaves that position out: a stand-in such as
    /// the tail's mean would be far off for a token the server cannot name, EOS above all).
    fn served_rows(&self, server: &ServedTeacher, batch: &TrainBatch) -> Result<(SparseTeacher, Tensor, usize)> {
        // The batch's own rows: on-policy batches hold sampled sequences, not the data's.
        let seqs: Vec<(&[i64], usize)> = batch.sequences.iter().filter(|(ids, from)| *from < ids.len()).map(|(ids, from)| (&ids[..], *from)).collect();
        let scored = server.score_many(&seqs)?;
        let k = server.score_top_k() as i64;
        let rows: Vec<_> = scored.iter().flat_map(|s| s.rows.iter().cloned()).collect();
        let sparse = sparse_teacher(&rows, k)?;
        let (mut lp, mut estimated) = (Vec::with_capacity(rows.len()), 0);
        for t in scored.iter().flat_map(|s| s.targets.iter()) {
            lp.push(match t {
                Some(v) => *v as f32,
                None => {
                    estimated += 1;
                    f32::NAN
                }
            });
        }
        Ok((sparse, Tensor::from_slice(&lp), estimated))
    }

    /// The micro-batches of `step`, each with whether it is on-policy. With `--on-policy`, a
    /// seeded coin per micro-batch (probability lambda) replaces its completions by the
    /// student's own, sampled from the current weights; with `--seq-kd` the others get the
    /// teacher's. Each row samples from its own stream keyed by (seed, step, micro-batch,
    /// row), so a resumed run samples the same tokens.
    fn sampled_batches(&self, sampler: &mut Sampler, step: i64) -> Result<(Vec<TrainBatch>, Vec<bool>, SampleStats)> {
        let batches = self.micro_batches(sampler, step);
        let op = &self.cfg.on_policy;
        let mut stats = SampleStats::default();
        if !op.samples() {
            let n = batches.len();
            return Ok((batches, vec![false; n], stats));
        }
        let start = Instant::now();
        let sampling = Sampling {
            max_new_tokens: op.max_new_tokens,
            temperature: op.temperature,
            top_k: None,
            top_p: op.top_p,
            eos: self.special.eos.clone(),
            pad: self.special.pad.or(self.special.eos.first().copied()).unwrap_or(0),
            stop: vec![],
        };
        let (mut out, mut policy) = (vec![], vec![]);
        for (m, batch) in batches.into_iter().enumerate() {
            let on = stream(self.cfg.seed, Stream::OnPolicyCoin { step: step as usize, micro: m }).next_f64() < op.lambda;
            let sampler_model = if on {
                Some(self.forward_model())
            } else if op.seq_kd {
                self.teacher.as_ref().map(|t| &t.model)
            } else {
                None
            };
            let by_server = !on && op.seq_kd && self.served.is_some();
            if sampler_model.is_none() && !by_server {
                out.push(batch);
                policy.push(false);
                continue;
            }
            let prompts: Vec<Vec<i64>> = batch.examples.iter().map(|&e| self.examples[e].ids[..self.examples[e].prompt_len].to_vec()).collect();
            let mut rngs: Vec<_> = (0..prompts.len())
                .map(|row| stream(self.cfg.seed, Stream::OnPolicySample { step: step as usize, micro: m, row }))
                .collect();
            let completions = match (sampler_model, self.served.as_ref()) {
                (Some(model), _) => generate(model, &prompts, &sampling, &mut rngs)?,
                (None, Some(server)) => {
                    let eos = sampling.eos.clone();
                    server.generate(&prompts, &sampling, &mut rngs, &|ids: &[i64]| ids.last().is_some_and(|t| eos.contains(t)))?
                }
                (None, None) => unreachable!("checked above"),
            };
            let sampled: Vec<Example> = batch
                .examples
                .iter()
                .zip(prompts.into_iter().zip(&completions))
                .map(|(&e, (mut ids, c))| {
                    let prompt_len = ids.len();
                    ids.extend(c);
                    ids.truncate(self.cfg.seq_len);
                    Example { ids, loss_from: prompt_len, record: self.examples[e].record, prompt_len }
                })
                .collect();
            stats.rows += completions.len();
            stats.tokens += completions.iter().map(Vec::len).sum::<usize>();
            let rows: Vec<usize> = (0..sampled.len()).collect();
            let mut new = TrainBatch::new(&sampled, &rows, self.device);
            new.examples = batch.examples;
            out.push(new);
            policy.push(on);
        }
        stats.seconds = start.elapsed().as_secs_f64();
        Ok((out, policy, stats))
    }

    /// The model forward passes run through: the compute copy, or the fp32 student itself.
    fn forward_model(&self) -> &CausalLm {
        self.compute_copy.as_ref().map_or(&self.student, |c| &c.model)
    }

    /// Forward and backward of one micro-batch; returns its unnormalised loss sums. Gradients
    /// end in the fp32 masters' `.grad`, multiplied by the loss scale when there is one.
    fn micro_step(&mut self, batch: &TrainBatch, depth: Option<usize>, n_loss: f64, n_valid: f64, on_policy: bool) -> Result<LossSums> {
        let scale = self.scaler.map_or(1.0, |s| s.scale);
        // The student's own samples are no target: on-policy batches train on KD alone.
        let alpha = if on_policy { 0.0 } else { self.cfg.alpha };
        let want_hidden = depth.is_some() || self.cfg.hidden_weight > 0.0;
        let want_attn = depth.is_none() && self.cfg.attn_weight > 0.0;
        // Attention maps only of the matched layers: [b, heads, t, t] each.
        let (s_attn, t_attn) = if want_attn {
            (LayerSet::of(self.pairs.iter().map(|p| p.0)), LayerSet::of(self.pairs.iter().map(|p| p.1)))
        } else {
            (LayerSet::default(), LayerSet::default())
        };
        // The live teacher runs only when some loss term reads its output.
        let teacher_needed = want_hidden || want_attn || (depth.is_none() && self.cfg.beta > 0.0);
        let sampled_estimate = on_policy && self.cfg.on_policy.estimator == OnPolicyEstimator::SampledToken;
        let teacher_start = Instant::now();
        // A served teacher scores the batch's sequences: its top-K rows and the targets' own
        // log-probabilities.
        let served_rows = match self.served.as_ref().filter(|_| depth.is_none() && self.cfg.beta > 0.0) {
            Some(server) => Some(self.served_rows(server, batch)?),
            None => None,
        };
        let served_rows = served_rows.map(|(rows, lp, estimated)| {
            self.estimated_targets += estimated;
            (rows, lp)
        });
        // Across tokenizers the teacher reads its own ids (below), not the student's.
        let t_out = match self.teacher.as_ref().filter(|_| self.cfg.teacher_logits.is_none() && self.cross.is_none() && teacher_needed) {
            Some(t) => {
                let cap = Capture { hidden_states: want_hidden, attentions: t_attn };
                Some(tch::no_grad(|| t.model.forward_hidden(&batch.input_ids, Some(&batch.attention_mask), cap, None))?)
            }
            None => None,
        };
        if let Device::Cuda(i) = self.device {
            // Kernels run asynchronously: wait for the teacher's before reading the clock.
            tch::Cuda::synchronize(i as i64);
        }
        self.teacher_seconds += teacher_start.elapsed().as_secs_f64();
        let model = self.forward_model();
        let capture = Capture { hidden_states: want_hidden, attentions: s_attn };
        // On the CPU the layers run from leaf inputs even without checkpointing (none
        // recomputed): the embedded rows' gradient then goes into the table's gradient in place,
        // where autograd's embedding backward would first build a dense gradient the size of the
        // table (113 MiB for SmolLM2's, freshly mapped every step: about 130 MB of peak RSS),
        // and Llama-style layers keep only what their hand-written backward pass reads (about
        // half of autograd's saved tensors: `forward_checkpointed`). A GPU keeps autograd's
        // pass, whose sorted embedding accumulation is deterministic (index_add_'s atomics are
        // not).
        let leaf_layers = self.cfg.gradient_checkpointing || self.device == Device::Cpu;
        let (s_out, checkpointed) = if leaf_layers {
            let recompute = if self.cfg.gradient_checkpointing { self.cfg.checkpoint_layers.unwrap_or(usize::MAX) } else { 0 };
            let (out, saved) = model.forward_checkpointed(&batch.input_ids, Some(&batch.attention_mask), capture, recompute)?;
            (out, Some(saved))
        } else {
            (model.forward_hidden(&batch.input_ids, Some(&batch.attention_mask), capture, None)?, None)
        };
        let valid = batch.attention_mask.ne(0);
        let mut sums = LossSums::default();
        let mut surrogate: Option<Tensor> = None;
        let mut add = |t: Tensor| {
            surrogate = Some(match surrogate.take() {
                Some(s) => s + t,
                None => t,
            })
        };
        if depth.is_none() && sampled_estimate {
            // The reverse KL estimated from the student's own sampled tokens (no CE: alpha is 0
            // on on-policy batches).
            let hs = batch.at_loss_positions(&s_out.hidden);
            let leaf = hs.detach().set_requires_grad(true);
            let teacher_lp = match (&served_rows, self.teacher.as_ref(), t_out.as_ref()) {
                (Some((_, lp)), _, _) => lp.to_device(self.device),
                (None, Some(t), Some(o)) => teacher_target_logprobs(&t.model, &batch.at_loss_positions(&o.hidden), &batch.targets, self.cfg.chunk),
                _ => bail!("the sampled-token estimate needs the teacher's log-probabilities of the sampled tokens"),
            };
            sums.kd = chunked_sampled_reverse_kl(model, &leaf, &batch.targets, &teacher_lp, self.cfg.chunk, self.cfg.beta * scale / n_loss, true);
            let g = leaf.grad();
            if g.defined() {
                add((hs * g).sum(Kind::Float));
            }
        } else if depth.is_none() && (alpha > 0.0 || self.cfg.beta > 0.0) {
            let hs = batch.at_loss_positions(&s_out.hidden);
            let leaf = hs.detach().set_requires_grad(true);
            let rows = if let Some((rows, _)) = served_rows {
                TeacherRows::Offline(rows.to_device(self.device))
            } else if self.cfg.teacher_logits.is_some() && self.cfg.beta > 0.0 && self.cross.is_none() {
                TeacherRows::Offline(self.stored_rows(batch)?)
            } else if let (Some(t), Some(o)) = (self.teacher.as_ref(), t_out.as_ref()) {
                if self.cfg.beta > 0.0 { TeacherRows::Online { model: &t.model, hidden: batch.at_loss_positions(&o.hidden) } } else { TeacherRows::None }
            } else {
                TeacherRows::None
            };
            let w = LogitLossWeights {
                alpha,
                beta: self.cfg.beta,
                temperature: self.cfg.temperature,
                divergence: self.cfg.divergence,
                chunk: self.cfg.chunk,
            };
            let fused = w.divergence == Divergence::ForwardKl && !matches!(rows, TeacherRows::Offline(_));
            let s = if fused {
                // The head gradient goes straight into the fp32 master, never rounded to the
                // compute dtype.
                chunked_forward_kl(model, &leaf, &batch.targets, &rows, &w, n_loss / scale, self.student.lm_head_weight())
            } else {
                chunked_logit_losses_autograd(model, &leaf, &batch.targets, &rows, &w, n_loss / scale, true)
            };
            sums.ce = if on_policy { 0.0 } else { s.ce };
            sums.kd = s.kd;
            let g = leaf.grad();
            if g.defined() {
                add((hs * g).sum(Kind::Float));
            }
        }
        if let (Some(cross), None, true) = (self.cross.as_ref(), depth, self.cfg.beta > 0.0) {
            // The teacher reads the same texts through its own tokenizer (or its stored rows
            // cover its stored ids); the loss compares the two sides per aligned span.
            let (_, st, sh_width) = s_out.hidden.size3()?;
            let s_flat = s_out.hidden.narrow(1, 0, st - 1).reshape([-1, sh_width]);
            // Row of each example's first teacher prediction, and the teacher's rows.
            let (first_row, side): (Vec<i64>, TeacherSide) = match (self.cfg.teacher_logits.is_some(), self.teacher.as_ref()) {
                (false, Some(t)) => {
                    let seqs: Vec<&[i64]> = batch
                        .examples
                        .iter()
                        .map(|&e| match cross.examples[e].teacher_ids.as_slice() {
                            [] => &[0i64][..],
                            ids => ids,
                        })
                        .collect();
                    let all: Vec<usize> = (0..seqs.len()).collect();
                    let padded = pad(&seqs, &all, 0, PadSide::Right, 2, self.device);
                    let th = tch::no_grad(|| t.model.forward_hidden(&padded.input_ids, Some(&padded.attention_mask), Capture::default(), None))?.hidden;
                    let (_, tt, th_width) = th.size3()?;
                    let first = (0..seqs.len() as i64).map(|r| r * (tt - 1)).collect();
                    (first, TeacherSide::Model { model: &t.model, hidden: th.narrow(1, 0, tt - 1).reshape([-1, th_width]) })
                }
                _ => {
                    let stored = self.stored.as_ref().expect("stored logits without a live teacher");
                    let (mut first, mut parts, mut at) = (vec![], vec![], 0);
                    for &e in &batch.examples {
                        let c = &cross.examples[e];
                        let need = c.teacher_ids.len().saturating_sub(c.rows_from) as i64;
                        let (rows, _) = stored.record_rows(self.examples[e].record)?;
                        ensure!(rows.indices.size()[0] >= need, "stored teacher logits have {} rows, the example needs {need}", rows.indices.size()[0]);
                        parts.push(rows.narrow(0, need));
                        first.push(at);
                        at += need;
                    }
                    let cat = |f: fn(&SparseTeacher) -> &Tensor| Tensor::cat(&parts.iter().map(f).collect::<Vec<_>>(), 0).to_device(self.device);
                    let rows = SparseTeacher { indices: cat(|p| &p.indices), logprobs: cat(|p| &p.logprobs), tail_logmass: cat(|p| &p.tail_logmass) };
                    (first, TeacherSide::TopK { rows, vocab: cross.teacher_vocab })
                }
            };
            let mut spans = SpanRows { student: vec![], teacher: vec![] };
            for (r, &e) in batch.examples.iter().enumerate() {
                let c = &cross.examples[e];
                for g in &c.groups {
                    // Student token i is predicted at position i - 1; teacher token j at its
                    // example's row j - rows_from.
                    spans.student.push(g.student.iter().map(|&i| r as i64 * (st - 1) + i as i64 - 1).collect());
                    spans.teacher.push(g.teacher.iter().map(|&j| first_row[r] + (j - c.rows_from) as i64).collect());
                }
            }
            let leaf = s_flat.detach().set_requires_grad(true);
            let w = CrossWeights {
                kind: self.cfg.cross_tokenizer.expect("cross data implies the setting"),
                divergence: self.cfg.divergence,
                temperature: self.cfg.temperature,
                top_k: self.cfg.uld_top_k,
                chunk: self.cfg.chunk,
            };
            sums.kd = chunked_span_loss(model, &leaf, &side, &spans, cross.map.as_ref(), &w, self.cfg.beta * scale / n_loss, true);
            let g = leaf.grad();
            if g.defined() {
                add((s_flat * g).sum(Kind::Float));
            }
        }
        if let Some(t_out) = &t_out {
            let gh = if depth.is_some() { self.cfg.hidden_weight.max(1.0) } else { self.cfg.hidden_weight };
            if want_hidden && gh > 0.0 {
                let mut total = Tensor::zeros([], (Kind::Float, self.device));
                let mut used = 0;
                for (i, &(s, t)) in self.pairs.iter().enumerate() {
                    if depth.is_some_and(|d| s >= d) {
                        continue;
                    }
                    let mut hs = s_out.hidden_states[s + 1].to_kind(Kind::Float);
                    if let Some(w) = &self.proj.weights[i] {
                        hs = hs.linear::<Tensor>(w, None);
                    }
                    total += hidden_loss_sum(&hs, &t_out.hidden_states[t + 1], &valid, self.cfg.hidden_metric);
                    used += 1;
                }
                if used > 0 {
                    let l = total / used as f64;
                    sums.hidden = l.double_value(&[]);
                    add(l * (gh * scale / n_valid));
                }
            }
            if want_attn {
                let mut total = Tensor::zeros([], (Kind::Float, self.device));
                for &(s, t) in &self.pairs {
                    let (sa, ta) = (s_out.attentions[s].as_ref(), t_out.attentions[t].as_ref());
                    total += attention_loss_sum(sa.context("student attention map not captured")?, ta.context("teacher attention map not captured")?, &valid)?;
                }
                let l = total / self.pairs.len().max(1) as f64;
                sums.attn = l.double_value(&[]);
                add(l * (self.cfg.attn_weight * scale / n_valid));
            }
        }
        if let Some(s) = surrogate {
            s.backward();
        }
        if let Some(saved) = checkpointed {
            // The captured hidden states are the saved layer inputs themselves: dropped here,
            // each input (and its gradient) is freed as the backward pass leaves its layer.
            drop(s_out);
            drop(t_out);
            // Under a compute copy the embedded rows' gradient goes straight to the fp32 masters.
            let masters = self.compute_copy.is_some().then(|| self.student.embedding_tables());
            model.backward_checkpointed(saved, masters);
        }
        if let Some(copy) = self.compute_copy.as_mut() {
            copy.move_gradients();
        }
        Ok(sums)
    }

    fn evaluate(&self) -> Result<Option<EvalMetrics>> {
        if self.eval_seqs.is_empty() {
            return Ok(None);
        }
        if let Some(copy) = &self.compute_copy {
            copy.refresh();
        }
        // Teacher KL needs a shared vocabulary.
        let teacher = self.teacher.as_ref().filter(|_| self.cross.is_none()).map(|t| t as &dyn Teacher);
        evaluate(self.forward_model(), teacher, &self.eval_seqs, self.cfg.batch_size.max(EVAL_BATCH_MIN), false, None).map(Some)
    }

    /// The unclipped fp32 gradients of step `step` (0-based) by parameter name, with its loss
    /// sums, computed exactly as training computes them and then cleared: the probe that
    /// compares precisions (tests/mixed_precision.rs).
    pub fn step_gradients(&mut self, step: i64) -> Result<(LossSums, Vec<(String, Tensor)>)> {
        let mut sampler = Sampler::new(self.examples.len(), self.cfg.seed);
        let work = self.accumulate_step(&mut sampler, step)?;
        let grads = self.opt.params().filter(|(_, p)| p.grad().defined()).map(|(n, p)| (n.to_string(), p.grad().copy())).collect();
        self.opt.zero_grad();
        Ok((work.sums, grads))
    }

    /// A step up to the update: the compute copy refreshed, the micro-batches (sampled where
    /// on-policy), forward and backward of each, and the masters' gradients unscaled.
    fn accumulate_step(&mut self, sampler: &mut Sampler, step: i64) -> Result<StepWork> {
        let depth = self.phase(step);
        self.teacher_seconds = 0.0;
        if let Some(copy) = &self.compute_copy {
            copy.refresh();
        }
        let (batches, policy, sampled) = self.sampled_batches(sampler, step)?;
        let n_loss: i64 = batches.iter().map(TrainBatch::loss_tokens).sum();
        let n_valid: i64 = batches.iter().map(TrainBatch::valid_tokens).sum();
        let mut sums = LossSums::default();
        for (b, &on) in batches.iter().zip(&policy) {
            sums += self.micro_step(b, depth, n_loss.max(1) as f64, n_valid.max(1) as f64, on)?;
        }
        if let Some(sc) = self.scaler {
            self.opt.scale_grads(1.0 / sc.scale);
        }
        Ok(StepWork { batches, policy, sampled, n_loss, n_valid, sums })
    }

    /// Runs the remaining steps; writes metrics rows, checkpoints and the final student.
    pub fn train(&mut self) -> Result<Summary> {
        let out = self.cfg.out.clone();
        std::fs::create_dir_all(&out)?;
        write_json_atomic(&out.join("distill_config.json"), &self.cfg)?;
        let metrics_path = out.join("metrics.csv");
        // Rows up to the restored step are kept (rewritten once, atomically); later rows are
        // appended as they come, without an fsync per step.
        let kept = read_metric_rows(&metrics_path, self.start_step)?;
        write_metric_rows(&metrics_path, &kept)?;
        let mut metrics = MetricsLog::open(&metrics_path, kept.is_empty())?;
        let mut sampler = Sampler::new(self.examples.len(), self.cfg.seed);
        let mut progress = Progress::new("distill", (self.cfg.steps - self.start_step) as u64);
        let start = Instant::now();
        let mut tokens_done = 0i64;
        let mut last = StepLog::default();
        let mut final_eval = None;
        if let Some(sig) = stop_requested() {
            return Err(self.stopped(sig, None).into());
        }
        for step in self.start_step..self.cfg.steps {
            let depth = self.phase(step);
            let StepWork { batches, policy, sampled, n_loss, n_valid, sums } = self.accumulate_step(&mut sampler, step)?;
            let grad_norm = self.opt.clip_grad_norm(self.cfg.clip);
            let lr = self.schedule.lr_at(step);
            let (ce, kd) = (sums.ce / n_loss.max(1) as f64, sums.kd / n_loss.max(1) as f64);
            let (hid, att) = (sums.hidden / n_valid.max(1) as f64, sums.attn / n_valid.max(1) as f64);
            let loss = match depth {
                Some(_) => self.cfg.hidden_weight.max(1.0) * hid,
                None => self.cfg.alpha * ce + self.cfg.beta * kd + self.cfg.hidden_weight * hid + self.cfg.attn_weight * att,
            };
            let done = step + 1;
            // The guard runs before the update, so a poisoned step never reaches the weights
            // or the AdamW moments. With f16 loss scaling, overflowing gradients under a
            // finite loss are the scaler's business: skip the update, halve the scale.
            let overflow = self.scaler.is_some() && loss.is_finite() && !grad_norm.is_finite();
            if let Some(sc) = self.scaler.as_mut().filter(|_| overflow) {
                self.opt.zero_grad();
                sc.overflowed();
                eprintln!("kd-distill: step {done}: f16 gradients overflowed; update skipped, loss scale now {}", sc.scale);
            } else if !(loss.is_finite() && grad_norm.is_finite()) {
                let what = format!(
                    "step {done}: non-finite loss or gradient norm (loss {loss}: ce {ce}, kd {kd}, hidden {hid}, attn {att}; \
                     gradient norm {grad_norm}) on records {}",
                    self.batch_ids(&batches)
                );
                self.opt.zero_grad();
                if self.skipped >= self.cfg.skip_nonfinite {
                    let saved = match self.last_saved {
                        Some(s) if s == step => format!("the state after step {step} is in {}", out.join(STATE_DIR).display()),
                        _ if step == 0 => "no step finished, nothing to save".to_string(),
                        _ => {
                            self.save_state(step)?;
                            format!("the state after step {step} (the last good one) is saved in {}", out.join(STATE_DIR).display())
                        }
                    };
                    bail!(
                        "{what}; stopped before applying it ({} of {} allowed skips used); {saved}. Lower --lr, check the \
                         data, or resume with --resume --skip-nonfinite N to skip such steps",
                        self.skipped,
                        self.cfg.skip_nonfinite
                    );
                }
                self.skipped += 1;
                eprintln!("kd-distill: warning: {what}; skipped ({} of {} allowed)", self.skipped, self.cfg.skip_nonfinite);
            } else {
                self.opt.step(lr);
                self.opt.zero_grad();
                if let Some(sc) = self.scaler.as_mut() {
                    sc.stepped();
                }
            }
            tokens_done += n_valid;
            last = StepLog {
                step: done,
                phase: depth.map_or("full".into(), |d| format!("layers<{d}")),
                lr,
                loss,
                ce,
                kd,
                hidden: hid,
                attn: att,
                grad_norm,
                tokens: n_valid,
                seconds: start.elapsed().as_secs_f64(),
                eval_perplexity: None,
                eval_teacher_kl: None,
                on_policy: policy.iter().filter(|&&on| on).count() as f64 / policy.len() as f64,
                sampled_tokens: sampled.mean_tokens(),
                sample_seconds: sampled.seconds,
                teacher_seconds: std::mem::take(&mut self.teacher_seconds),
            };
            let eval_now = (self.cfg.eval_every > 0 && done % self.cfg.eval_every == 0) || done == self.cfg.steps;
            if eval_now {
                if let Some(m) = self.evaluate()? {
                    last.eval_perplexity = Some(m.perplexity);
                    last.eval_teacher_kl = m.teacher_kl;
                    final_eval = Some(m);
                }
            }
            if done % self.cfg.log_every.max(1) == 0 || eval_now {
                metrics.append(&last)?;
            }
            if (self.cfg.save_every > 0 && done % self.cfg.save_every == 0) || done == self.cfg.steps {
                self.save_state(done)?;
            }
            progress.inc(1, &format!("loss {loss:.4}"));
            if let Some(sig) = stop_requested().filter(|_| done < self.cfg.steps) {
                progress.finish();
                if self.last_saved != Some(done) {
                    self.save_state(done)?;
                }
                return Err(self.stopped(sig, Some(done)).into());
            }
        }
        progress.finish();
        if self.start_step >= self.cfg.steps {
            // Resumed after the last step: the export may be what was lost.
            self.save_state(self.cfg.steps)?;
        }
        let secs = start.elapsed().as_secs_f64();
        if self.estimated_targets > 0 {
            eprintln!(
                "kd-distill: {} target tokens had no log-probability from the server (outside its top-K, or a string that \
                 names several tokens); the sampled-token estimate left them out",
                self.estimated_targets
            );
        }
        Ok(Summary { steps: self.cfg.steps, skipped: self.skipped, final_eval, last, tokens_per_second: tokens_done as f64 / secs.max(1e-9) })
    }
}



fn read_metric_rows(path: &Path, up_to_step: i64) -> Result<Vec<StepLog>> {
    // A resumed run rewrites the rows logged after its checkpoint, so the CSV stays one row
    // per step. Rows are read by column name, so reordered columns cannot shift values.
    let mut rows = vec![];
    if up_to_step == 0 || !path.exists() {
        return Ok(rows);
    }
    let mut r = csv::Reader::from_path(path)?;
    for row in r.deserialize::<StepLog>() {
        let row = row.with_context(|| format!("{}: unreadable metrics row", path.display()))?;
        if row.step > up_to_step {
            break;
        }
        rows.push(row);
    }
    Ok(rows)
}

fn write_metric_rows(path: &Path, rows: &[StepLog]) -> Result<()> {
    if rows.is_empty() {
        let _ = std::fs::remove_file(path);
        return Ok(());
    }
    let mut w = csv::Writer::from_writer(vec![]);
    for r in rows {
        w.serialize(r)?;
    }
    write_atomic(path, &w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?)
}

/// `metrics.csv`, appended one row per logged step and flushed (a log, not a checkpoint).
struct MetricsLog {
    w: csv::Writer<std::fs::File>,
}

impl MetricsLog {
    fn open(path: &Path, header: bool) -> Result<MetricsLog> {
        let f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        Ok(MetricsLog { w: csv::WriterBuilder::new().has_headers(header).from_writer(f) })
    }

    fn append(&mut self, row: &StepLog) -> Result<()> {
        self.w.serialize(row)?;
        self.w.flush()?;
        Ok(())
    }
}
