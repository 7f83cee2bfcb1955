//! What every stage binary shares: the entry point (error report and exit status), the
//! runtime flags (`--device`, `--dtype`), the training-loop flags of kd-distill and
//! kd-finetune, and model loading. Each binary parses its flags, calls one library
//! function, and prints its summary.
use anyhow::Result;
use distillery::base::device::{parse_device, parse_dtype};
use distillery::base::signals::{self, OnSecond, StopSignal, Stopped, EXIT_STOPPED};
use distillery::train::losses::{Divergence, HiddenMetric};
use distillery::train::trainer::{DistillConfig, LayerMap, Summary, TrainSchedule};
use std::path::PathBuf;
use tch::{Device, Kind};

/// Runs a stage's body; prints its summary, or `stage: error: ...` with its causes and
/// exits 1. A run stopped by a signal after saving its state prints where and exits
/// [`EXIT_STOPPED`] (75). Either way the invocation goes to the command log when
/// `KD_COMMAND_LOG` is set.
pub fn run(stage: &str, body: impl FnOnce() -> Result<String>) {
    use distillery::base::provenance::{log_command, CommandRecord};
    distillery::base::alloc::tune_cpu_allocator();
    let started = std::time::SystemTime::now();
    let result = body();
    if let Err(e) = log_command(&CommandRecord::new(stage, started, result.is_ok())) {
        eprintln!("{stage}: warning: command log not written: {e:#}");
    }
    match result {
        Ok(summary) => println!("{summary}"),
        Err(e) if e.downcast_ref::<Stopped>().is_some() => {
            eprintln!("{stage}: {e}");
            std::process::exit(EXIT_STOPPED);
        }
        Err(e) => {
            eprintln!("{stage}: error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            std::process::exit(1);
        }
    }
}

/// Where and in what precision a stage runs.
#[derive(clap::Args, Clone, Debug)]
pub struct Runtime {
    /// auto (CUDA when present, else the CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Compute precision: auto (bf16 on CUDA, f32 on the CPU), f32, bf16 or f16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
}

impl Runtime {
    pub fn resolve(&self) -> Result<(Device, Kind)> {
        let d = parse_device(&self.device)?;
        Ok((d, parse_dtype(&self.dtype, d)?))
    }
}

/// A teacher behind an OpenAI-compatible server instead of a local model.
#[derive(clap::Args, Clone, Debug)]
pub struct ServedArgs {
    /// Base URL of a server holding the teacher (vLLM, SGLang, llama.cpp's llama-server;
    /// llama-cpp-python's server for teacher-forced scoring only),
    /// e.g. http://127.0.0.1:8000; used instead of --teacher. An API key, if the server
    /// wants one, is read from DISTILLERY_TEACHER_API_KEY (or OPENAI_API_KEY).
    #[arg(long, requires = "teacher_tokenizer")]
    pub teacher_url: Option<String>,
    /// The served model's tokenizer: a tokenizer.json directory, a Hugging Face model
    /// directory or hub id, or a .gguf. Gives the ids and chat template; checked against the
    /// server's tokenizer at start.
    #[arg(long)]
    pub teacher_tokenizer: Option<String>,
    /// auto (from the server's /v1/models), llamacpp, vllm, sglang or llama-cpp-python.
    #[arg(long, default_value = "auto")]
    pub teacher_engine: String,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8)]
    pub teacher_concurrency: usize,
    /// Seconds a request may take before it is retried.
    #[arg(long, default_value_t = 600.0)]
    pub teacher_timeout: f64,
    /// Retries of a request answered 408/429/5xx, timed out or cut off (backoff 0.25 s
    /// doubling to 8 s), before the stage fails (finished work is kept for --resume).
    #[arg(long, default_value_t = 10)]
    pub teacher_retries: usize,
    /// Top-K the server returns per position when scoring given text.
    #[arg(long, default_value_t = 20)]
    pub teacher_top_k: usize,
}

impl ServedArgs {
    /// Connects to the server (capability probe included), when --teacher-url is given.
    pub fn connect(&self, top_k: Option<usize>, scoring: bool) -> Result<Option<distillery::teacher::served::ServedTeacher>> {
        let Some(url) = &self.teacher_url else { return Ok(None) };
        Ok(Some(self.connect_with(url, self.teacher_tokenizer.as_deref().unwrap_or_default(), top_k, scoring)?))
    }

    /// Another served model (a judge) with these flags' engine, timeout, retries and top-K;
    /// its replies must carry the top-K log-probabilities (the judge's verdicts are read
    /// from them).
    pub fn connect_to(&self, url: &str, tokenizer: &str) -> Result<distillery::teacher::served::ServedTeacher> {
        self.connect_with(url, tokenizer, Some(self.teacher_top_k), false)
    }

    /// The settings a training run keeps, when --teacher-url is given.
    pub fn settings(&self) -> Option<distillery::teacher::served::ServedSettings> {
        let url = self.teacher_url.as_ref()?;
        Some(self.settings_for(url, self.teacher_tokenizer.as_deref().unwrap_or_default()))
    }

    fn settings_for(&self, url: &str, tokenizer: &str) -> distillery::teacher::served::ServedSettings {
        distillery::teacher::served::ServedSettings {
            url: url.to_string(),
            tokenizer: tokenizer.to_string(),
            engine: self.teacher_engine.clone(),
            concurrency: self.teacher_concurrency,
            timeout_s: self.teacher_timeout,
            retries: self.teacher_retries,
            top_k: self.teacher_top_k,
        }
    }

    fn connect_with(&self, url: &str, tokenizer: &str, top_k: Option<usize>, scoring: bool) -> Result<distillery::teacher::served::ServedTeacher> {
        distillery::teacher::served::ServedTeacher::connect(self.settings_for(url, tokenizer).options()?, top_k, scoring)
    }
}

/// Training-loop flags shared by kd-distill and kd-finetune.
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
    #[command(flatten)]
    pub runtime: Runtime,
    /// Continue from <out>/train_state.
    #[arg(long)]
    pub resume: bool,
    /// Skip up to N optimizer steps whose loss or gradient norm is NaN or infinite (logged);
    /// with 0 the run stops at the first, keeping the last good state.
    #[arg(long, default_value_t = 0)]
    pub skip_nonfinite: usize,
    /// Recompute each student layer's activations during the backward pass instead of keeping
    /// them (activation checkpointing): about a tenth slower, and activation memory falls from
    /// every layer's intermediates to one tensor a layer.
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// With --gradient-checkpointing, recompute only the first N student layers; the later
    /// ones keep their activations (each layer kept costs its activation memory and saves its
    /// share of the extra forward pass).
    #[arg(long, value_name = "N", requires = "gradient_checkpointing")]
    pub checkpoint_layers: Option<usize>,
    /// Checkpoints kept in <out>/train_state (the newest K).
    #[arg(long, default_value_t = 1)]
    pub keep_last: usize,
    #[command(flatten)]
    pub stop: StopArgs,
}

/// The signals that stop a long run cleanly.
#[derive(clap::Args, Clone, Debug)]
pub struct StopArgs {
    /// Signals that make the run finish its current optimizer step, save its state and exit
    /// with status 75 (a second one aborts at once, keeping the last saved state).
    #[arg(long, value_delimiter = ',', default_value = "TERM,INT,USR1")]
    pub stop_signals: Vec<StopSignal>,
}

impl StopArgs {
    pub fn install(&self, on_second: OnSecond) -> Result<()> {
        signals::install(&self.stop_signals, on_second)
    }
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
            layer_map: LayerMap::Uniform,
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
            schedule: TrainSchedule::Standard,
            phase_steps: None,
            include_prompt_loss: self.include_prompt_loss,
            chunk: 0,
            seed: self.seed,
            device: self.runtime.device.clone(),
            dtype: self.runtime.dtype.clone(),
            skip_nonfinite: self.skip_nonfinite,
            gradient_checkpointing: self.gradient_checkpointing,
            checkpoint_layers: self.checkpoint_layers,
            keep_last: self.keep_last,
            on_policy: Default::default(),
            cross_tokenizer: None,
            uld_top_k: 256,
            served_teacher: None,
            teacher_tokenizer: None,
        }
    }
}

/// The last line of a training run.
pub fn training_summary(s: &Summary, out: &std::path::Path, with_kd: bool) -> String {
    let mut line = if with_kd {
        format!(
            "{} steps, final loss {:.4} (ce {:.4}, kd {:.4}), {:.0} tokens/s",
            s.steps, s.last.loss, s.last.ce, s.last.kd, s.tokens_per_second
        )
    } else {
        format!("{} steps, final task loss {:.4}", s.steps, s.last.ce)
    };
    if s.skipped > 0 {
        line += &format!("; {} non-finite step(s) skipped", s.skipped);
    }
    if let Some(m) = &s.final_eval {
        line += &format!("; held-out perplexity {:.3}", m.perplexity);
        if let Some(kl) = m.teacher_kl.filter(|_| with_kd) {
            line += &format!(", teacher KL {kl:.4}");
        }
    }
    format!("{line} -> {}", out.display())
}
