//! kd-report: the size-versus-quality picture over every evaluated model: a markdown table
//! with 95% intervals, curves in SVG and PNG, paired verdicts, side-by-side samples and a
//! reproducibility card (and with --html, all of it on one page), from kd-eval JSONs.
use clap::Parser;
use distillery::stages::report::{run, ReportOptions};
use std::path::PathBuf;

#[derive(Parser)]
#[command(about = "Tabulate, plot and compare kd-eval results: size against quality, with intervals and paired tests")]
struct Args {
    /// kd-eval metrics JSON files (their .items.json sidecars are read beside them).
    #[arg(long, num_args = 1.., required = true)]
    metrics: Vec<PathBuf>,
    /// Output folder for report.md, size_vs_quality.svg and size_vs_quality.png.
    #[arg(long)]
    out: PathBuf,
    /// Name of the distilled student and of the baseline it is judged against.
    #[arg(long)]
    student: Option<String>,
    #[arg(long)]
    baseline: Option<String>,
    /// Judge every model of another strategy against the model of this strategy with the
    /// same size and training seed (kd-eval --strategy).
    #[arg(long)]
    baseline_strategy: Option<String>,
    /// The command log the stages appended to (KD_COMMAND_LOG): exact command lines on the
    /// reproducibility card.
    #[arg(long)]
    commands: Option<PathBuf>,
    /// JSON from scripts/environment.py (torch, transformers, Python, machine) for the card.
    #[arg(long)]
    environment: Option<PathBuf>,
    /// Also write report.html: table, plots, samples and card on one page.
    #[arg(long)]
    html: bool,
    /// Bootstrap resamples of the paired comparisons (seed 0).
    #[arg(long, default_value_t = distillery::base::stats::BOOTSTRAP_SAMPLES)]
    bootstrap_samples: usize,
    #[arg(long, default_value = "Distillation results")]
    title: String,
    /// kd-eval --pairwise results: a judge table (win, tie and loss rates with intervals)
    /// and the first pairs with their verdicts.
    #[arg(long, num_args = 1..)]
    judgements: Vec<PathBuf>,
    /// kd-eval --targeted results (one per model): the targeted-set table, and the
    /// student's answers against the baseline's (McNemar over the same prompts).
    #[arg(long, num_args = 1..)]
    targeted: Vec<PathBuf>,
}

fn main() {
    kd_cli::run("kd-report", || {
        let a = Args::parse();
        run(&ReportOptions {
            metrics: a.metrics,
            out: a.out,
            student: a.student,
            baseline: a.baseline,
            baseline_strategy: a.baseline_strategy,
            commands: a.commands,
            environment: a.environment,
            html: a.html,
            bootstrap_samples: a.bootstrap_samples,
            title: a.title,
            judgements: a.judgements,
            targeted: a.targeted,
        })
    });
}
