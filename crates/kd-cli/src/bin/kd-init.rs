//! kd-init: create the student checkpoint a distillation run starts from.
use anyhow::{bail, ensure, Context, Result};
use clap::{Parser, ValueEnum};
use distillery::checkpoint::save_pretrained;
use distillery::cli;
use distillery::student::{
    choose_pruning, copy_from_teacher, measure_importance, random_student, scaled_config, uniform_layer_map, ShapeSpec,
};
use distillery::{CausalLm, InitMode, ModelConfig};
use serde_json::json;
use std::path::PathBuf;

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Init {
    /// transformers-style random initialisation (seeded).
    Random,
    /// Copy chosen teacher layers, embeddings, final norm and head (DistilBERT).
    CopyLayers,
    /// Minitron-style structured pruning from activation importance on --calib records.
    Prune,
}

#[derive(Parser)]
#[command(about = "Build a student: scaled-down teacher or another architecture, random, copied or pruned")]
struct Args {
    /// Teacher model (directory or hub id). May be left out only with --config and
    /// --tokenizer, to build a model from scratch (e.g. the demo teacher).
    #[arg(long)]
    teacher: Option<String>,
    /// Directory whose tokenizer files the new model gets (with --config, no teacher).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value = "random")]
    init: Init,
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
    #[arg(long, default_value_t = 0)]
    seed: i64,
    #[arg(long, default_value = "auto")]
    device: String,
    /// Precision of the saved student.
    #[arg(long, default_value = "f32")]
    dtype: String,
}

fn main() {
    cli::run("kd-init", || run(Args::parse()));
}

/// A randomly initialised model from --config, with the tokenizer of --tokenizer.
fn from_scratch(args: &Args, device: tch::Device, kind: tch::Kind) -> Result<()> {
    let (Some(config), Some(tok_dir)) = (&args.config, &args.tokenizer) else {
        bail!("--teacher is required (without one, give --config and --tokenizer to build a model from scratch)");
    };
    ensure!(args.init == Init::Random, "without a teacher only --init random is possible");
    let cfg = ModelConfig::from_file(config)?;
    let side_files: Vec<PathBuf> = distillery::checkpoint::SIDE_FILES
        .iter()
        .map(|f| tok_dir.join(f))
        .filter(|p| p.is_file())
        .collect();
    let files = distillery::ModelFiles { name: tok_dir.display().to_string(), config: config.clone(), weights: vec![], side_files };
    let tok = distillery::tokenizer::Tok::load(&files)?;
    ensure!(
        tok.vocab_size() as i64 <= cfg.vocab_size,
        "{}: the tokenizer has {} tokens, more than the config's vocab_size {}",
        config.display(),
        tok.vocab_size(),
        cfg.vocab_size
    );
    tch::manual_seed(args.seed);
    let model = CausalLm::new(cfg, device, kind, InitMode::Random);
    let report = json!({"init": "random", "teacher": null, "seed": args.seed, "config": config.display().to_string(),
                        "student_params": model.param_count(), "layer_map": []});
    save_pretrained(&model, &args.out, Some(&files), &[("distillery_init.json", &report)])?;
    println!("model {} params -> {}", model.param_count(), args.out.display());
    Ok(())
}

fn run(args: Args) -> Result<()> {
    let shape = ShapeSpec {
        layers: args.layers,
        hidden: args.hidden,
        heads: args.heads,
        kv_heads: args.kv_heads,
        intermediate: args.intermediate,
    };
    // Cheap checks before loading anything.
    if args.init == Init::Prune && args.calib.is_none() {
        bail!("--init prune needs --calib FILE.jsonl (records to measure importance on)");
    }
    if args.config.is_some() && args.init != Init::Random {
        bail!("--config builds a different architecture, which only --init random supports");
    }
    if args.out.join("model.safetensors").exists() {
        bail!("{} already holds a checkpoint; choose another --out or remove it", args.out.display());
    }
    let (device, kind) = cli::device_and_kind(&args.device, &args.dtype)?;
    let Some(teacher_spec) = args.teacher.clone() else {
        return from_scratch(&args, device, kind);
    };
    let (teacher, files, tok) = cli::load(&teacher_spec, device, kind)?;
    let tcfg = &teacher.config;
    let cfg = match &args.config {
        Some(path) => {
            let c = ModelConfig::from_file(path)?;
            ensure!(
                c.vocab_size == tcfg.vocab_size,
                "{}: vocab_size {} differs from the teacher's {}; the student must share the teacher's tokenizer",
                path.display(),
                c.vocab_size,
                tcfg.vocab_size
            );
            c
        }
        None => scaled_config(tcfg, &shape, args.init == Init::Prune)?,
    };
    let n_student = cfg.num_layers as usize;
    let n_teacher = tcfg.num_layers as usize;
    let same_widths = cfg.hidden_size == tcfg.hidden_size
        && cfg.num_heads == tcfg.num_heads
        && cfg.num_kv_heads == tcfg.num_kv_heads
        && cfg.intermediate_size == tcfg.intermediate_size
        && cfg.head_dim == tcfg.head_dim;
    let (student, layer_map) = match args.init {
        Init::Random => {
            let map = uniform_layer_map(n_student.min(n_teacher), n_teacher);
            (random_student(cfg, &teacher, args.seed), map)
        }
        Init::CopyLayers => {
            ensure!(same_widths, "--init copy-layers copies whole layers, so widths must match the teacher's; use --init prune to shrink widths");
            let map = match &args.keep_layers {
                Some(k) => {
                    ensure!(k.len() == n_student || args.layers.is_none(), "--keep-layers lists {} layers but --layers is {n_student}", k.len());
                    ensure!(k.iter().all(|&i| i < n_teacher), "--keep-layers: the teacher has layers 0..{}", n_teacher - 1);
                    ensure!(k.windows(2).all(|w| w[0] < w[1]), "--keep-layers must be strictly increasing");
                    k.clone()
                }
                None => uniform_layer_map(n_student, n_teacher),
            };
            let mut cfg = cfg;
            cfg.num_layers = map.len() as i64;
            let student = CausalLm::new(cfg, device, kind, InitMode::ForLoading);
            copy_from_teacher(&student, &teacher, &map, None)?;
            (student, map)
        }
        Init::Prune => {
            let calib = args.calib.as_ref().unwrap();
            let (_, mut seqs) = cli::read_and_tokenize(calib, &tok, Some(args.calib_max_length))?;
            seqs.truncate(args.calib_limit);
            let imp = measure_importance(&teacher, &seqs).context("measuring importance")?;
            let (map, keep) = choose_pruning(tcfg, &cfg, &imp)?;
            let student = CausalLm::new(cfg, device, kind, InitMode::ForLoading);
            copy_from_teacher(&student, &teacher, &map, Some(&keep))?;
            (student, map)
        }
    };
    let t_params = teacher.param_count();
    let s_params = student.param_count();
    let bytes = |m: &CausalLm| m.param_count() * m.kind().elt_size_in_bytes() as i64;
    let report = json!({
        "init": format!("{:?}", args.init.to_possible_value().unwrap().get_name()).trim_matches('"'),
        "teacher": teacher_spec,
        "seed": args.seed,
        "shape": shape,
        "model_type": student.config.arch.model_type(),
        "teacher_params": t_params,
        "student_params": s_params,
        "teacher_weight_bytes": bytes(&teacher),
        "student_weight_bytes": bytes(&student),
        "compression_ratio": t_params as f64 / s_params as f64,
        "layer_map": layer_map,
    });
    save_pretrained(&student, &args.out, Some(&files), &[])?;
    // Sizes on disk are known only once written; the report goes in last.
    let on_disk = cli::dir_bytes(&args.out);
    let teacher_disk: u64 = files.weights.iter().filter_map(|w| std::fs::metadata(w).ok()).map(|m| m.len()).sum();
    let mut report = report;
    report["student_weights_bytes_on_disk"] = json!(std::fs::metadata(args.out.join("model.safetensors"))?.len());
    report["student_dir_bytes_on_disk"] = json!(on_disk);
    report["teacher_weights_bytes_on_disk"] = json!(teacher_disk);
    distillery::io::write_json_atomic(&args.out.join("distillery_init.json"), &report)?;
    println!(
        "student {} params ({} bytes on disk), teacher {} params: {:.2}x smaller; layer map {:?} -> {}",
        s_params,
        on_disk,
        t_params,
        t_params as f64 / s_params as f64,
        layer_map,
        args.out.display()
    );
    Ok(())
}
