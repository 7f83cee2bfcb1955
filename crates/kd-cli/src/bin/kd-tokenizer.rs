//! kd-tokenizer: train a byte-level BPE tokenizer of a chosen size on records, for a
//! student with its own vocabulary (then kd-init --tokenizer, kd-distill --cross-tokenizer).
use clap::Parser;
use distillery::stages::tokenizer::{run, TokenizerOptions};
use std::path::PathBuf;

#[derive(Parser)]
#[command(about = "Train a byte-level BPE tokenizer on records (special tokens and chat template from --like)")]
struct Args {
    /// Records (JSONL) whose text (`text`, or `prompt` + `completion`) the tokenizer learns from.
    #[arg(long)]
    data: PathBuf,
    /// Tokens in the vocabulary, special tokens and the 256 byte symbols included.
    #[arg(long)]
    vocab_size: usize,
    /// Output folder: tokenizer.json and tokenizer_config.json.
    #[arg(long)]
    out: PathBuf,
    /// A model (directory or hub id) whose special tokens, BOS/EOS template and chat template to carry over.
    #[arg(long)]
    like: Option<String>,
    /// Merge only pairs seen at least this often.
    #[arg(long, default_value_t = 2)]
    min_frequency: u64,
}

fn main() {
    kd_cli::run("kd-tokenizer", || {
        let a = Args::parse();
        run(&TokenizerOptions { data: a.data, vocab_size: a.vocab_size, out: a.out, like: a.like, min_frequency: a.min_frequency })
    });
}
