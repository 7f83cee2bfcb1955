//! kd-convert: a GGUF file (or any model argument) as a Hugging Face checkpoint directory,
//! for tools that need one.
use clap::Parser;
use std::path::PathBuf;

#[derive(Parser)]
#[command(about = "Convert a model (e.g. a .gguf file) to a Hugging Face directory (fp32 safetensors + tokenizer)")]
struct Args {
    /// A .gguf file, a checkpoint directory or a hub id.
    #[arg(long)]
    model: String,
    #[arg(long)]
    out: PathBuf,
}

fn main() {
    kd_cli::run("kd-convert", || {
        let a = Args::parse();
        distillery::stages::export::convert(&a.model, &a.out)
    });
}
