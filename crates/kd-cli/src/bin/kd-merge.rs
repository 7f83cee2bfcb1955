//! kd-merge: joins the outputs of a stage run as `--shard I/N` (kd-generate, kd-filter,
//! kd-eval, kd-augment) into what the unsharded run writes: records, logits sidecar and
//! summary, found beside each shard.
use clap::Parser;
use std::path::PathBuf;

#[derive(Parser)]
#[command(about = "Join the outputs of sharded kd-generate, kd-filter, kd-eval or kd-augment runs")]
struct Args {
    /// The joined output (its sidecar and summary are written beside it).
    #[arg(long)]
    out: PathBuf,
    /// Every shard's output (in any order); each one's summary and sidecar are found beside it.
    #[arg(required = true)]
    shards: Vec<PathBuf>,
}

fn main() {
    kd_cli::run("kd-merge", || {
        let a = Args::parse();
        distillery::stages::merge::run(&a.out, &a.shards)
    });
}
