//! kd-init: create the student checkpoint a distillation run starts from: a scaled-down
//! teacher or another architecture, initialised randomly, from teacher layers, or pruned.
use clap::Parser;
use distillery::stages::init::{run, InitMethod, InitOptions, ShapeSpec};
use std::path::PathBuf;

#[derive(Parser)]
#[command(about = "Build a student: scaled-down teacher or another architecture, random, copied or pruned")]
struct Args {
    /// Teacher model (directory or hub id). May be left out only with --config and
    /// --tokenizer, to build a model from scratch (e.g. the demo teacher).
    #[arg(long)]
    teacher: Option<String>,
    /// Directory whose tokenizer files the new model gets. With a teacher: a vocabulary of the
    /// student's own (kd-tokenizer output), each new token's embedding the mean of the teacher
    /// tokens its text decomposes into; without one (and --config): a model from scratch.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    #[arg(long)]
    out: PathBuf,
    /// random (transformers-style, seeded), copy-layers (chosen teacher layers, DistilBERT)
    /// or prune (Minitron-style structured pruning from activation importance on --calib).
    #[arg(long, default_value = "random")]
    init: InitMethod,
    #[arg(long)]
    layers: Option<i64>,
    #[arg(long)]
    hidden: Option<i64>,
    #[arg(long)]
    heads: Option<i64>,
    #[arg(long)]
    kv_heads: Option<i64>,
    #[arg(long)]
    intermediate: Option<i64>,
    /// A config.json for a different supported architecture sharing the teacher's tokenizer
    /// (random init only).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Teacher layers to copy, e.g. `0,2,4` (copy-layers; default: spread uniformly).
    #[arg(long, value_delimiter = ',')]
    keep_layers: Option<Vec<usize>>,
    /// Calibration records for --init prune.
    #[arg(long)]
    calib: Option<PathBuf>,
    /// Calibration records used at most.
    #[arg(long, default_value_t = 256)]
    calib_limit: usize,
    /// Tokens per calibration record at most.
    #[arg(long, default_value_t = 512)]
    calib_max_length: usize,
    /// --init prune: choose heads, channels and layers at random (seeded) instead of by
    /// their activation importance, to measure what the importance estimate is worth.
    #[arg(long)]
    random_importance: bool,
    #[arg(long, default_value_t = 0)]
    seed: i64,
    /// auto (CUDA when present, else the CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Precision of the saved student (auto: f32).
    #[arg(long, default_value = "f32")]
    dtype: String,
}

fn main() {
    kd_cli::run("kd-init", || {
        let a = Args::parse();
        // A saved student is fp32 unless asked otherwise, on any device.
        let dtype = if a.dtype == "auto" { "f32".to_string() } else { a.dtype };
        let (device, kind) = kd_cli::Runtime { device: a.device, dtype }.resolve()?;
        run(&InitOptions {
            teacher: a.teacher,
            tokenizer: a.tokenizer,
            out: a.out,
            init: a.init,
            shape: ShapeSpec { layers: a.layers, hidden: a.hidden, heads: a.heads, kv_heads: a.kv_heads, intermediate: a.intermediate },
            config: a.config,
            keep_layers: a.keep_layers,
            calib: a.calib,
            calib_limit: a.calib_limit,
            random_importance: a.random_importance,
            calib_max_length: a.calib_max_length,
            seed: a.seed,
            device,
            kind,
        })
    });
}
