//! kd-logits: offline-logits sidecars: convert one to the other format, or read one through
//! the reader training uses; both report their throughput.
use clap::{Parser, Subcommand};
use distillery::data::teacher_logits::LogitsFormat;
use std::path::PathBuf;

#[derive(Parser)]
#[command(about = "Convert or read offline teacher-logits sidecars")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Rewrite a JSONL's records (`teacher_logits` pointers) and sidecar in another format.
    Convert {
        /// Records with `teacher_logits` pointers (kd-generate --store-logits output).
        #[arg(long)]
        data: PathBuf,
        /// The new JSONL; its sidecar is written beside it.
        #[arg(long)]
        out: PathBuf,
        /// safetensors or compact.
        #[arg(long, default_value = "compact")]
        format: LogitsFormat,
    },
    /// Read every record's rows, as training does, and report the rate.
    Read {
        #[arg(long)]
        data: PathBuf,
        /// Read this sidecar instead of each pointer's file.
        #[arg(long)]
        logits: Option<PathBuf>,
    },
}

fn main() {
    kd_cli::run("kd-logits", || match Args::parse().command {
        Command::Convert { data, out, format } => {
            let _lock = distillery::base::lock::OutputLock::acquire(&out)?;
            distillery::stages::logits::convert(&data, &out, format)
        }
        Command::Read { data, logits } => distillery::stages::logits::read(&data, logits.as_deref()),
    });
}
