//! kd-export: a student checkpoint as a GGUF file that llama.cpp and ollama run as it is.
use anyhow::ensure;
use clap::Parser;
use distillery::model::gguf_hf::ExportType;
use std::path::PathBuf;

#[derive(Parser)]
#[command(about = "Export a checkpoint to GGUF (llama, mistral, qwen2, qwen3; byte-level BPE tokenizer)")]
struct Args {
    /// Checkpoint directory (or hub id).
    #[arg(long)]
    model: String,
    /// Output format; gguf is the one there is.
    #[arg(long, default_value = "gguf")]
    format: String,
    /// Precision of the matrices: f32, f16, bf16 or q8_0 (vectors stay f32).
    #[arg(long, default_value = "f16")]
    r#type: ExportType,
    #[arg(long)]
    out: PathBuf,
}

fn main() {
    kd_cli::run("kd-export", || {
        let a = Args::parse();
        ensure!(a.format == "gguf", "--format must be gguf, got `{}`", a.format);
        distillery::stages::export::export(&a.model, &a.out, a.r#type)
    });
}
