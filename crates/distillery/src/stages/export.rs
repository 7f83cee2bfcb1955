//! kd-convert and kd-export: between this project's Hugging Face checkpoints and GGUF, the
//! format llama.cpp, ollama and LM Studio run.
use crate::base::io::write_atomic;
use crate::model::checkpoint::{read_tensors, resolve, save_pretrained};
use crate::model::config::ModelConfig;
use crate::model::gguf_hf::{export_gguf, ExportType};
use anyhow::{ensure, Context, Result};
use serde_json::Value;
use std::path::Path;
use tch::{Device, Kind};

/// Writes a model (a `.gguf` file, or anything else a model argument may be) as a Hugging
/// Face directory: fp32 safetensors, config and tokenizer files.
pub fn convert(model: &str, out: &Path) -> Result<String> {
    ensure!(!out.join("model.safetensors").exists(), "{} already holds a checkpoint; choose another --out", out.display());
    let (m, files) = crate::model::load_model(model, Device::Cpu, Kind::Float).with_context(|| format!("loading `{model}`"))?;
    save_pretrained(&m, out, Some(&files), &[])?;
    Ok(format!("{} ({} params) -> {}", model, m.param_count(), out.display()))
}

fn read_json(path: Option<&Path>) -> Result<Value> {
    match path {
        Some(p) => serde_json::from_str(&std::fs::read_to_string(p)?).with_context(|| format!("{}: invalid JSON", p.display())),
        None => Ok(Value::Null),
    }
}

/// Writes a checkpoint as a GGUF file of the given precision.
pub fn export(model: &str, out: &Path, ty: ExportType) -> Result<String> {
    let files = resolve(model)?;
    let cfg = ModelConfig::from_file(&files.config)?;
    let tensors = read_tensors(&files, &cfg)?;
    let tokenizer = read_json(files.side_file("tokenizer.json"))?;
    ensure!(!tokenizer.is_null(), "model `{model}` has no tokenizer.json");
    let tokenizer_config = read_json(files.side_file("tokenizer_config.json"))?;
    let bytes = export_gguf(&cfg, &tensors, &tokenizer, &tokenizer_config, ty).with_context(|| format!("exporting `{model}`"))?;
    write_atomic(out, &bytes)?;
    Ok(format!("{model} -> {} ({:.1} MB, {ty:?})", out.display(), bytes.len() as f64 / 1e6))
}
