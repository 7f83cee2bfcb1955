//! kd-report: the size-versus-quality picture over every evaluated model: a markdown table
//! and an SVG plot, from kd-eval JSONs.
use clap::Parser;
use distillery::stages::report::{run, ReportOptions};
use std::path::PathBuf;

#[derive(Parser)]
#[command(about = "Tabulate and plot size against quality over kd-eval results")]
struct Args {
    /// kd-eval metrics JSON files.
    #[arg(long, num_args = 1.., required = true)]
    metrics: Vec<PathBuf>,
    /// Output folder for report.md and size_vs_quality.svg.
    #[arg(long)]
    out: PathBuf,
    /// Name of the distilled student and of the baseline it is judged against.
    #[arg(long)]
    student: Option<String>,
    #[arg(long)]
    baseline: Option<String>,
    #[arg(long, default_value = "Distillation results")]
    title: String,
}

fn main() {
    kd_cli::run("kd-report", || {
        let a = Args::parse();
        run(&ReportOptions { metrics: a.metrics, out: a.out, student: a.student, baseline: a.baseline, title: a.title })
    });
}
