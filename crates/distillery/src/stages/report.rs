//! kd-report: the size-versus-quality picture over every evaluated model (teacher, teacher
//! assistants, students, baselines): a markdown table and an SVG plot, from kd-eval JSONs.
use crate::base::io::write_atomic;
use anyhow::{bail, ensure, Context, Result};
use plotters::prelude::*;
use serde_json::Value;
use std::path::PathBuf;

pub struct ReportOptions {
    /// kd-eval metrics JSON files.
    pub metrics: Vec<PathBuf>,
    /// Output folder for report.md and size_vs_quality.svg.
    pub out: PathBuf,
    /// Name of the distilled student and of the baseline it is judged against.
    pub student: Option<String>,
    pub baseline: Option<String>,
    pub title: String,
}

struct Row {
    name: String,
    v: Value,
}

impl Row {
    fn f(&self, k: &str) -> Option<f64> {
        self.v.get(k).and_then(Value::as_f64)
    }
}

fn fmt(x: Option<f64>, digits: usize, scale: f64) -> String {
    x.map_or("–".into(), |v| format!("{:.*}", digits, v * scale))
}

/// Writes report.md and size_vs_quality.svg into `o.out`; returns the summary line.
pub fn run(o: &ReportOptions) -> Result<String> {
    let mut rows = vec![];
    for p in &o.metrics {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)
            .with_context(|| format!("{}: invalid JSON", p.display()))?;
        ensure!(v.get("params").is_some(), "{}: not a kd-eval metrics file (no `params`)", p.display());
        let name = v.get("name").and_then(Value::as_str).unwrap_or("?").to_string();
        rows.push(Row { name, v });
    }
    rows.sort_by(|a, b| b.f("params").unwrap_or(0.0).total_cmp(&a.f("params").unwrap_or(0.0)));
    let largest = rows.first().and_then(|r| r.f("params")).unwrap_or(1.0);

    let mut md = format!("# {}\n\n![size versus quality](size_vs_quality.svg)\n\n", o.title);
    md += "| model | params | size vs largest | bytes on disk | perplexity | teacher KL | top-1 agreement | multiple choice | cloze | ROUGE-L | ms/token (batch 1) | tokens/s (batch N) |\n";
    md += "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    for r in &rows {
        md += &format!(
            "| {} | {} | {:.2}x | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.name,
            r.v["params"],
            largest / r.f("params").unwrap_or(1.0),
            r.v["bytes_on_disk"],
            fmt(r.f("perplexity"), 3, 1.0),
            fmt(r.f("teacher_kl"), 4, 1.0),
            fmt(r.f("top1_agreement"), 1, 100.0) + if r.f("top1_agreement").is_some() { "%" } else { "" },
            fmt(r.f("mc_accuracy"), 1, 100.0) + if r.f("mc_accuracy").is_some() { "%" } else { "" },
            fmt(r.f("cloze_accuracy"), 1, 100.0) + if r.f("cloze_accuracy").is_some() { "%" } else { "" },
            fmt(r.f("rouge_l"), 3, 1.0),
            fmt(r.f("latency_ms_per_token"), 2, 1.0),
            fmt(r.f("throughput_tokens_per_s"), 0, 1.0),
        );
    }
    if let (Some(s), Some(b)) = (&o.student, &o.baseline) {
        let find = |n: &str| rows.iter().find(|r| &r.name == n).with_context(|| format!("no metrics named `{n}`"));
        let (s, b) = (find(s)?, find(b)?);
        md += "\n## Distilled student against the baseline\n\n";
        for (key, label) in [("perplexity", "held-out perplexity"), ("teacher_kl", "held-out KL from the teacher"), ("mc_accuracy", "multiple-choice accuracy")] {
            if let (Some(x), Some(y)) = (s.f(key), b.f(key)) {
                let better = if key == "mc_accuracy" { x > y } else { x < y };
                md += &format!(
                    "* {label}: {} {:.4} vs {} {:.4}: the distilled student is **{}**.\n",
                    s.name, x, b.name, y, if better { "better" } else if x == y { "equal" } else { "worse" }
                );
            }
        }
    }
    std::fs::create_dir_all(&o.out)?;
    plot(&rows, &o.out.join("size_vs_quality.svg"), &o.title)?;
    write_atomic(&o.out.join("report.md"), md.as_bytes())?;
    Ok(format!("report of {} model(s) -> {}", rows.len(), o.out.join("report.md").display()))
}

/// Two panels: parameters (log scale) against perplexity (log scale), and against teacher
/// KL. One colour per model, named in each panel's legend (models of one size overlap).
fn plot(rows: &[Row], path: &std::path::Path, title: &str) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("drawing the plot: {e}");
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1100, 460)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let root = root.titled(title, ("sans-serif", 20)).map_err(|e| err(&e))?;
        let panels = root.split_evenly((1, 2));
        for (panel, (key, label)) in panels.iter().zip([("perplexity", "held-out perplexity (log scale)"), ("teacher_kl", "KL from teacher")]) {
            let pts: Vec<(f64, f64, &str, usize)> = rows
                .iter()
                .enumerate()
                .filter_map(|(i, r)| Some((r.f("params")?, r.f(key)?, r.name.as_str(), i)))
                .collect();
            if pts.is_empty() {
                continue;
            }
            let (xmin, xmax) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
            let (ymin, ymax) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
            let mut builder = ChartBuilder::on(panel);
            builder.margin(20).x_label_area_size(40).y_label_area_size(60);
            let xs = (xmin * 0.7..xmax * 1.4).log_scale();
            macro_rules! draw {
                ($chart:expr) => {{
                    let mut chart = $chart;
                    chart
                        .configure_mesh()
                        .x_desc("parameters (log scale)")
                        .y_desc(label)
                        .x_label_formatter(&|x| format!("{:.2}M", x / 1e6))
                        .draw()
                        .map_err(|e| err(&e))?;
                    for &(x, y, name, i) in &pts {
                        let color = Palette99::pick(i).to_rgba();
                        chart
                            .draw_series(std::iter::once(Circle::new((x, y), 6, color.filled())))
                            .map_err(|e| err(&e))?
                            .label(name)
                            .legend(move |(lx, ly)| Circle::new((lx + 6, ly), 5, color.filled()));
                    }
                    chart
                        .configure_series_labels()
                        .position(SeriesLabelPosition::UpperRight)
                        .background_style(WHITE.mix(0.85))
                        .border_style(BLACK.mix(0.3))
                        .label_font(("sans-serif", 12))
                        .draw()
                        .map_err(|e| err(&e))?;
                }};
            }
            if key == "perplexity" {
                let ys = (ymin * 0.8..ymax * 1.25).log_scale();
                draw!(builder.build_cartesian_2d(xs, ys).map_err(|e| err(&e))?);
            } else {
                let pad = ((ymax - ymin) * 0.1).max(1e-3);
                draw!(builder.build_cartesian_2d(xs, (ymin - pad).max(0.0)..ymax + pad).map_err(|e| err(&e))?);
            }
        }
        root.present().map_err(|e| err(&e))?;
    }
    if svg.is_empty() {
        bail!("nothing to plot");
    }
    write_atomic(path, svg.as_bytes())
}
