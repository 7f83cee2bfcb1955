//! The model layer: architectures ([`arch`]), configs, the forward pass ([`causal_lm`]),
//! checkpoints (local directories and the hub), tokenizers and chat templates, and
//! batched decoding with a KV cache.
pub mod arch;
pub mod causal_lm;
pub mod checkpoint;
pub mod config;
pub mod decode;
pub mod gguf;
pub mod gguf_hf;
pub mod row_kernels;
pub mod token_bytes;
pub mod tokenizer;

pub use arch::{Arch, ArchSpec};
pub use causal_lm::{CausalLm, InitMode};
pub use checkpoint::{load_model, save_pretrained, ModelFiles};
pub use config::ModelConfig;

use anyhow::{Context, Result};
use tch::{Device, Kind};
use tokenizer::Tok;

/// Loads a model and its tokenizer; errors name the model argument.
pub fn load(spec: &str, device: Device, kind: Kind) -> Result<(CausalLm, ModelFiles, Tok)> {
    let (model, files) = load_model(spec, device, kind).with_context(|| format!("loading model `{spec}`"))?;
    let tok = Tok::load(&files)?;
    Ok((model, files, tok))
}
