//! kd-chain: teacher -> TA1 -> ... -> student through teacher assistants; each hop is
//! kd-init + kd-distill with the previous model as teacher, and an interrupted chain
//! resumes at its hop.
use clap::Parser;
use distillery::stages::chain::{run, ChainOptions};
use distillery::stages::init::InitMethod;
use std::path::PathBuf;

#[derive(Parser)]
#[command(about = "Distil through a chain of teacher assistants")]
struct Args {
    #[arg(long)]
    teacher: String,
    /// Hop shapes, `;`-separated, each a `,`-list of kd-init flags without dashes, e.g.
    /// `layers=3,hidden=192,heads=3;layers=2,hidden=128,heads=2`. The last is the student.
    #[arg(long)]
    sizes: String,
    #[arg(long)]
    data: PathBuf,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 100)]
    steps: i64,
    /// kd-init method per hop: random, copy-layers or prune (prune needs --calib).
    #[arg(long, default_value = "random")]
    init: InitMethod,
    #[arg(long)]
    calib: Option<PathBuf>,
    /// Held-out records: each hop's model is evaluated against its own teacher.
    #[arg(long)]
    eval_data: Option<PathBuf>,
    /// Extra kd-distill flags for every hop, whitespace-separated (e.g. "--beta 0.7 --lr 2e-3").
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    distill_args: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value = "auto")]
    device: String,
    #[command(flatten)]
    stop: kd_cli::StopArgs,
}

fn main() {
    kd_cli::run("kd-chain", || {
        let a = Args::parse();
        // A second signal is forwarded to the running hop rather than ending kd-chain first.
        a.stop.install(distillery::base::signals::OnSecond::Count)?;
        // The other stages are the binaries beside this one.
        let exe = std::env::current_exe()?;
        let bin_dir = exe.parent().unwrap_or(std::path::Path::new("."));
        let o = ChainOptions {
            teacher: a.teacher,
            sizes: a.sizes,
            data: a.data,
            out: a.out,
            steps: a.steps,
            init: a.init,
            calib: a.calib,
            eval_data: a.eval_data,
            distill_args: a.distill_args,
            seed: a.seed,
            device: a.device,
            stop_signals: a.stop.stop_signals.iter().map(|s| format!("{s:?}").to_uppercase()).collect::<Vec<_>>().join(","),
        };
        run(&o, bin_dir)
    });
}
