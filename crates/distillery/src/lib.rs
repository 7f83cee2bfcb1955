//! Distillery: knowledge distillation of decoder-only language models.
//!
//! The library is layered; each layer uses only those above it in this list:
//! * [`base`]: atomic files, seeded random streams, device and precision, progress;
//! * [`model`]: architectures, configs, the forward pass, checkpoints, tokenizers, decoding;
//! * [`data`]: records, the record-to-ids rule, padded batches, examples, stored logits;
//! * [`teacher`]: the seam every stage reads a teacher through (a local model, stored
//!   top-k logits, and later a server);
//! * [`train`]: losses, the optimizer and the training engine;
//! * [`stages`]: one module per pipeline stage; the `kd-*` binaries are thin front ends.
//!
//! docs/ARCHITECTURE.md draws the data flow and says where to add an architecture, a loss
//! or a stage.
pub mod base;
pub mod data;
pub mod model;
pub mod stages;
pub mod teacher;
pub mod train;

pub use model::{Arch, CausalLm, InitMode, ModelConfig, ModelFiles};
