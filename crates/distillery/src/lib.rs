//! Distillery: knowledge distillation of decoder-only language models.
//!
//! One library for every pipeline stage: model configs and the forward pass ([`model`]),
//! checkpoint I/O ([`checkpoint`]), tokenizers, JSONL records, evaluation and generation.
//! The `kd-*` binaries are thin front ends over it.
pub mod augment;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod data;
pub mod distill;
pub mod eval;
pub mod generate;
pub mod io;
pub mod losses;
pub mod model;
pub mod optim;
pub mod records;
pub mod rng;
pub mod runtime;
pub mod scoring;
pub mod selection;
pub mod student;
pub mod tasks;
pub mod teacher_logits;
pub mod tokenizer;

pub use checkpoint::{load_model, save_pretrained, ModelFiles};
pub use config::{Arch, ModelConfig};
pub use model::{CausalLm, InitMode};
