//! The stages of the pipeline, one module each; every `kd-*` binary parses its flags and
//! calls one function here.
pub mod augment;
pub mod chain;
pub mod eval;
pub mod export;
pub mod filter;
pub mod init;
pub mod logits;
pub mod merge;
pub mod report;
pub mod tokenizer;
pub mod transfer;
