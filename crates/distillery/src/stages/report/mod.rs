//! kd-report: the size-versus-quality picture over every evaluated model (teacher, teacher
//! assistants, students, baselines), from kd-eval JSONs and their per-item sidecars:
//! a markdown table with 95% intervals, curves (one line per strategy, seed spread as error
//! bars, the teacher as a reference line, the Pareto frontier) in SVG and PNG, verdicts from
//! paired tests over the same items, side-by-side samples, a reproducibility card, and with
//! `--html` all of it on one page.
mod card;
mod html;
mod judged;
mod plot;

use crate::base::io::write_atomic;
use crate::base::stats::{median_range, paired_accuracy, paired_bootstrap, Paired, BOOTSTRAP_SEED};
use anyhow::{ensure, Context, Result};
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub struct ReportOptions {
    /// kd-eval metrics JSON files.
    pub metrics: Vec<PathBuf>,
    /// Output folder for report.md, size_vs_quality.svg/.png (and report.html).
    pub out: PathBuf,
    /// Name of the distilled student and of the baseline it is judged against.
    pub student: Option<String>,
    pub baseline: Option<String>,
    /// Judge every model of another strategy against the model of this strategy with the
    /// same size and seed (the sweep's CE-only students).
    pub baseline_strategy: Option<String>,
    /// The command log the stages wrote (`KD_COMMAND_LOG`), for the reproducibility card.
    pub commands: Option<PathBuf>,
    /// scripts/environment.py's JSON (torch, transformers, Python, machine), for the card.
    pub environment: Option<PathBuf>,
    /// Also write report.html (table, plots, samples and card on one page).
    pub html: bool,
    pub bootstrap_samples: usize,
    pub title: String,
    /// kd-eval --pairwise results (judge verdicts of one model against another).
    pub judgements: Vec<PathBuf>,
    /// kd-eval --targeted results (one per model): the targeted-set table.
    pub targeted: Vec<PathBuf>,
}

/// kd-eval's sidecar: per-item outcomes in item order.
#[derive(Deserialize, Default, Clone)]
pub(crate) struct Items {
    pub records: Option<RecordItems>,
    pub mc: Option<Outcomes>,
    pub cloze: Option<Outcomes>,
    #[serde(default)]
    pub generations: Vec<Generation>,
    #[serde(default)]
    pub targeted: Vec<TargetedItem>,
}

/// One targeted prompt's scores (kd-eval --targeted).
#[derive(Deserialize, Clone)]
pub(crate) struct TargetedItem {
    pub id: String,
    pub contains_answer: Option<f64>,
}

#[derive(Deserialize, Clone)]
pub(crate) struct RecordItems {
    pub ids: Vec<String>,
    pub tokens: Vec<f64>,
    pub nll: Vec<f64>,
    pub kl: Option<Vec<f64>>,
    /// Bytes of text each record's targets spell (bits per byte).
    #[serde(default)]
    pub bytes: Option<Vec<f64>>,
}

#[derive(Deserialize, Clone)]
pub(crate) struct Outcomes {
    pub ids: Vec<String>,
    pub correct: Vec<bool>,
}

#[derive(Deserialize, Clone)]
pub(crate) struct Generation {
    pub id: String,
    pub prompt: String,
    pub output: String,
}

/// One evaluated model.
pub(crate) struct Row {
    pub name: String,
    pub v: Value,
    pub items: Option<Items>,
    /// Latency and throughput after pooling models of one shape: (median, min, max).
    pub latency: Option<(f64, f64, f64)>,
    pub throughput: Option<(f64, f64, f64)>,
    /// Name of the first model of the same shape when the speed was pooled with others.
    pub same_shape: Option<(String, usize)>,
}

impl Row {
    pub fn f(&self, k: &str) -> Option<f64> {
        self.v.get(k).and_then(Value::as_f64)
    }
    pub fn s(&self, k: &str) -> Option<&str> {
        self.v.get(k).and_then(Value::as_str)
    }
    pub fn ci(&self, k: &str) -> Option<(f64, f64)> {
        let a = self.v.get(format!("{k}_ci95"))?.as_array()?;
        Some((a.first()?.as_f64()?, a.get(1)?.as_f64()?))
    }
    /// The curve this model belongs to: its `--strategy`, else its name.
    pub fn strategy(&self) -> &str {
        self.s("strategy").unwrap_or(&self.name)
    }
    pub fn seed(&self) -> Option<u64> {
        self.v.get("train_seed").and_then(Value::as_u64)
    }
    pub fn is_teacher(&self) -> bool {
        self.strategy() == "teacher" || self.name == "teacher"
    }
}

fn read_row(p: &Path) -> Result<Row> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)
        .with_context(|| format!("{}: invalid JSON", p.display()))?;
    ensure!(v.get("params").is_some(), "{}: not a kd-eval metrics file (no `params`)", p.display());
    let name = v.get("name").and_then(Value::as_str).unwrap_or("?").to_string();
    let items = match v.get("items_file").and_then(Value::as_str) {
        Some(f) => {
            let ip = p.with_file_name(f);
            let text = std::fs::read_to_string(&ip).with_context(|| format!("reading {} (named by {})", ip.display(), p.display()))?;
            Some(serde_json::from_str(&text).with_context(|| format!("{}: not a kd-eval items file", ip.display()))?)
        }
        None => None,
    };
    Ok(Row { name, v, items, latency: None, throughput: None, same_shape: None })
}

/// Models of one shape run the same computation: their speed rounds are pooled into one
/// median and range, so that identical models are never reported with noise-driven
/// differences.
fn pool_speed(rows: &mut [Row]) {
    let samples = |r: &Row, k: &str| -> Vec<f64> {
        match r.v.get(format!("{k}_samples")).and_then(Value::as_array) {
            Some(a) => a.iter().filter_map(Value::as_f64).collect(),
            None => r.f(k).into_iter().collect(),
        }
    };
    let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, r) in rows.iter().enumerate() {
        let key = r.s("shape").map(|s| format!("{s} {}", r.s("device").unwrap_or(""))).unwrap_or_else(|| format!("#{i}"));
        groups.entry(key).or_default().push(i);
    }
    for members in groups.values() {
        let pooled = |k: &str| -> Option<(f64, f64, f64)> {
            let all: Vec<f64> = members.iter().flat_map(|&i| samples(&rows[i], k)).collect();
            (!all.is_empty()).then(|| median_range(&all))
        };
        let (lat, thr) = (pooled("latency_ms_per_token"), pooled("throughput_tokens_per_s"));
        let first = rows[members[0]].name.clone();
        for &i in members {
            rows[i].latency = lat;
            rows[i].throughput = thr;
            if members.len() > 1 {
                rows[i].same_shape = Some((first.clone(), members.len()));
            }
        }
    }
}

/// One metric two models are compared on.
#[derive(Clone, Copy)]
pub(crate) enum Metric {
    Perplexity,
    TeacherKl,
    Mc,
    Cloze,
    /// Comparable across tokenizers, where perplexity and KL are not.
    BitsPerByte,
    /// Targeted prompts whose answer holds a reference answer (kd-eval --targeted).
    TargetedContains,
}

impl Metric {
    pub const ALL: [Metric; 6] =
        [Metric::Perplexity, Metric::TeacherKl, Metric::Mc, Metric::Cloze, Metric::BitsPerByte, Metric::TargetedContains];
    /// The columns of the per-strategy verdict table (models of one size share a tokenizer).
    pub const TABLE: [Metric; 4] = [Metric::Perplexity, Metric::TeacherKl, Metric::Mc, Metric::Cloze];
    pub fn label(self) -> &'static str {
        match self {
            Metric::Perplexity => "held-out perplexity",
            Metric::TeacherKl => "held-out KL from the teacher",
            Metric::Mc => "multiple-choice accuracy",
            Metric::Cloze => "cloze accuracy",
            Metric::BitsPerByte => "held-out bits per byte",
            Metric::TargetedContains => "targeted set, answers holding the reference",
        }
    }
    pub fn key(self) -> &'static str {
        match self {
            Metric::Perplexity => "perplexity",
            Metric::TeacherKl => "teacher_kl",
            Metric::Mc => "mc_accuracy",
            Metric::Cloze => "cloze_accuracy",
            Metric::BitsPerByte => "bits_per_byte",
            Metric::TargetedContains => "targeted_contains_answer",
        }
    }
}

/// A paired comparison of `a` against `b` on `m`, or why there is none.
pub(crate) fn compare(a: &Row, b: &Row, m: Metric, samples: usize) -> std::result::Result<(Paired, usize), String> {
    let (ia, ib) = match (&a.items, &b.items) {
        (Some(x), Some(y)) => (x, y),
        _ => return Err("no per-item outcomes (kd-eval's .items.json) to pair".into()),
    };
    let same = |x: &[String], y: &[String]| -> std::result::Result<(), String> {
        if x == y { Ok(()) } else { Err("the two models were evaluated on different items".into()) }
    };
    match m {
        Metric::Perplexity | Metric::TeacherKl => {
            let (ra, rb) = ia.records.as_ref().zip(ib.records.as_ref()).ok_or("no held-out records in one of them")?;
            same(&ra.ids, &rb.ids)?;
            if ra.tokens != rb.tokens {
                return Err("different token counts per record (different tokenizers)".into());
            }
            let r = if let Metric::Perplexity = m {
                paired_bootstrap((&ra.nll, &ra.tokens), (&rb.nll, &rb.tokens), samples, BOOTSTRAP_SEED, f64::exp, true)
            } else {
                let (ka, kb) = ra.kl.as_ref().zip(rb.kl.as_ref()).ok_or("no teacher KL in one of them")?;
                paired_bootstrap((ka, &ra.tokens), (kb, &rb.tokens), samples, BOOTSTRAP_SEED, |x| x, true)
            };
            Ok((r, ra.ids.len()))
        }
        Metric::BitsPerByte => {
            let (ra, rb) = ia.records.as_ref().zip(ib.records.as_ref()).ok_or("no held-out records in one of them")?;
            same(&ra.ids, &rb.ids)?;
            let (ba, bb) = ra.bytes.as_ref().zip(rb.bytes.as_ref()).ok_or("no bytes per record in one of them")?;
            let bits = |r: &RecordItems| r.nll.iter().map(|x| x / std::f64::consts::LN_2).collect::<Vec<f64>>();
            Ok((paired_bootstrap((&bits(ra), ba), (&bits(rb), bb), samples, BOOTSTRAP_SEED, |x| x, true), ra.ids.len()))
        }
        Metric::Mc | Metric::Cloze => {
            let pick = |i: &Items| if let Metric::Mc = m { i.mc.clone() } else { i.cloze.clone() };
            let (oa, ob) = pick(ia).zip(pick(ib)).ok_or("not evaluated on this task in one of them")?;
            same(&oa.ids, &ob.ids)?;
            Ok((paired_accuracy(&oa.correct, &ob.correct), oa.ids.len()))
        }
        Metric::TargetedContains => {
            let hits = |i: &Items| -> (Vec<String>, Vec<bool>) {
                i.targeted.iter().filter_map(|t| Some((t.id.clone(), t.contains_answer? > 0.5))).unzip()
            };
            let ((ida, ca), (idb, cb)) = (hits(ia), hits(ib));
            if ida.is_empty() || idb.is_empty() {
                return Err("no targeted answers in one of them".into());
            }
            same(&ida, &idb)?;
            Ok((paired_accuracy(&ca, &cb), ida.len()))
        }
    }
}

/// "value [low, high]" with the metric's scale and digits.
pub(crate) fn with_ci(r: &Row, key: &str, digits: usize, scale: f64, unit: &str) -> String {
    match r.f(key) {
        None => "–".into(),
        Some(v) => match r.ci(key) {
            Some((lo, hi)) => format!("{:.*}{unit} [{:.*}, {:.*}]", digits, v * scale, digits, lo * scale, digits, hi * scale),
            None => format!("{:.*}{unit}", digits, v * scale),
        },
    }
}

fn fmt(x: Option<f64>, digits: usize) -> String {
    x.map_or("–".into(), |v| format!("{:.*}", digits, v))
}

/// One verdict line of `a` against `b`.
pub(crate) fn verdict_text(a: &Row, b: &Row, m: Metric, samples: usize) -> (String, Option<&'static str>) {
    let scale = if matches!(m, Metric::Mc | Metric::Cloze | Metric::TargetedContains) { 100.0 } else { 1.0 };
    let unit = if scale == 100.0 { " points" } else { "" };
    let (va, vb) = (a.f(m.key()).unwrap_or(f64::NAN), b.f(m.key()).unwrap_or(f64::NAN));
    let head = if scale == 100.0 {
        format!("{} {:.1}% vs {} {:.1}%", a.name, va * 100.0, b.name, vb * 100.0)
    } else {
        format!("{} {:.4} vs {} {:.4}", a.name, va, b.name, vb)
    };
    match compare(a, b, m, samples) {
        Ok((p, n)) => {
            let d = if scale == 100.0 { 1 } else { 4 };
            let evidence = match (p.p_value, p.interval) {
                (Some(pv), _) => format!("McNemar exact p = {pv:.3} over {n} paired items"),
                (None, Some((lo, hi))) => {
                    format!("95% interval [{:+.*}, {:+.*}] (paired bootstrap over {n} records)", d, lo * scale, d, hi * scale)
                }
                (None, None) => String::new(),
            };
            (format!("{head}; difference {:+.*}{unit}, {evidence}: **{}**", d, p.diff * scale, p.verdict.as_str()), Some(p.verdict.as_str()))
        }
        Err(why) => (format!("{head}; not tested: {why}"), None),
    }
}

/// Writes report.md, size_vs_quality.svg/.png (and report.html) into `o.out`; returns the
/// summary line.
pub fn run(o: &ReportOptions) -> Result<String> {
    ensure!(o.bootstrap_samples > 0, "--bootstrap-samples must be positive");
    let mut rows = o.metrics.iter().map(|p| read_row(p)).collect::<Result<Vec<_>>>()?;
    // Largest first; within a size, by strategy then seed.
    rows.sort_by(|a, b| {
        b.f("params").unwrap_or(0.0).total_cmp(&a.f("params").unwrap_or(0.0)).then(a.strategy().cmp(b.strategy())).then(a.seed().cmp(&b.seed()))
    });
    pool_speed(&mut rows);
    let pair = match (&o.student, &o.baseline) {
        (Some(s), Some(b)) => {
            let find = |n: &str| rows.iter().position(|r| r.name == n).with_context(|| format!("no metrics named `{n}`"));
            Some((find(s)?, find(b)?))
        }
        _ => None,
    };
    std::fs::create_dir_all(&o.out)?;
    let fig = plot::Figure::new(&rows, &o.title);
    let panels = fig.draw(&o.out.join("size_vs_quality.svg"), &o.out.join("size_vs_quality.png"))?;
    let card = card::Card::collect(&rows, &o.metrics, o.commands.as_deref(), o.environment.as_deref(), o.bootstrap_samples)?;

    let largest = rows.first().and_then(|r| r.f("params")).unwrap_or(1.0);
    let mut md = format!("# {}\n\n![size versus quality](size_vs_quality.svg)\n\n", o.title);
    md += &format!(
        "Curves: {panels}. One line per strategy through the mean over seeds, error bars from the lowest to the highest seed; \
         the dashed line is the teacher; the grey band joins the Pareto frontier (no other model is both smaller and better). \
         PNG: [size_vs_quality.png](size_vs_quality.png).\n\n"
    );
    md += "Intervals are 95%: Wilson for accuracies, percentile bootstrap over held-out records for perplexity, KL and agreement \
           (see the card at the end). Speed: median over repeated rounds, range in parentheses.\n\n";
    // Bits per byte compares models whose tokenizers differ (per-token perplexity does not):
    // a column of its own when some model was measured so.
    let bpb = rows.iter().any(|r| r.f("bits_per_byte").is_some());
    let (bpb_head, bpb_rule) = if bpb { (" bits/byte |", "---:|") } else { ("", "") };
    md += &format!("| model | strategy | seed | params | size vs largest | bytes on disk | perplexity |{bpb_head} teacher KL | top-1 agreement | multiple choice | cloze | ROUGE-L | ms/token (batch 1) | tokens/s (batch N) |\n");
    md += &format!("|---|---|---:|---:|---:|---:|---:|{bpb_rule}---:|---:|---:|---:|---:|---:|---:|\n");
    let mut shape_notes = BTreeMap::new();
    for r in &rows {
        let mark = r.same_shape.as_ref().map_or(String::new(), |(first, n)| {
            shape_notes.insert(first.clone(), *n);
            format!(" ¹ {n} of {first}'s shape")
        });
        md += &format!(
            "| {} | {} | {} | {} | {:.2}x | {} | {} |{} {} | {} | {} | {} | {} | {} | {} |\n",
            r.name,
            r.strategy(),
            r.seed().map_or("–".into(), |s| s.to_string()),
            r.v["params"],
            largest / r.f("params").unwrap_or(1.0),
            r.v["bytes_on_disk"],
            with_ci(r, "perplexity", 2, 1.0, ""),
            if bpb { format!(" {} |", with_ci(r, "bits_per_byte", 4, 1.0, "")) } else { String::new() },
            with_ci(r, "teacher_kl", 4, 1.0, ""),
            with_ci(r, "top1_agreement", 1, 100.0, "%"),
            with_ci(r, "mc_accuracy", 1, 100.0, "%"),
            with_ci(r, "cloze_accuracy", 1, 100.0, "%"),
            fmt(r.f("rouge_l"), 3),
            r.latency.map_or("–".into(), |(m, lo, hi)| format!("{m:.2} ({lo:.2}–{hi:.2}){mark}")),
            r.throughput.map_or("–".into(), |(m, _, _)| format!("{m:.0}")),
        );
    }
    if !shape_notes.is_empty() {
        md += "\n¹ Models of one shape run the same computation, so their speed is measured together: every round of every \
               such model pooled into one median and range, shown against each.\n";
    }
    md += &strategy_summary(&rows);
    let mut verdicts = vec![];
    if let Some((s, b)) = pair {
        md += "\n## Distilled student against the baseline\n\n";
        for m in Metric::ALL {
            if rows[s].f(m.key()).is_some() && rows[b].f(m.key()).is_some() {
                let (line, v) = verdict_text(&rows[s], &rows[b], m, o.bootstrap_samples);
                md += &format!("* {}: {line}.\n", m.label());
                verdicts.extend(v);
            }
        }
        md += "\n\"no significant difference\": the 95% interval of the paired difference covers zero (perplexity, KL), or \
               McNemar's exact p >= 0.05 (accuracies).\n";
    }
    if let Some(base) = &o.baseline_strategy {
        md += &strategy_verdicts(&rows, base, o.bootstrap_samples, &mut verdicts);
    }
    let targeted = o.targeted.iter().map(|p| read_row(p)).collect::<Result<Vec<_>>>()?;
    md += &judged::targeted_section(&targeted, o.student.as_deref().zip(o.baseline.as_deref()), o.bootstrap_samples, &mut verdicts);
    md += &judged::judge_section(&o.judgements, &mut verdicts)?;
    let card_md = card.markdown();
    if o.html {
        // The page: the same report, with every sample and the plot inline.
        let all = format!("{md}{}{card_md}", samples_markdown(&rows, usize::MAX, "every prompt"));
        let svg = std::fs::read_to_string(o.out.join("size_vs_quality.svg"))?;
        write_atomic(&o.out.join("report.html"), html::page(&o.title, &all, &svg).as_bytes())?;
    }
    md += &samples_markdown(&rows, 3, "the first 3 prompts; report.html has every one");
    md += &card_md;
    write_atomic(&o.out.join("report.md"), md.as_bytes())?;
    let counts = ["better", "worse", "no significant difference"].map(|w| verdicts.iter().filter(|&&v| v == w).count());
    Ok(format!(
        "report of {} model(s), {} verdict(s) ({} better, {} worse, {} no significant difference) -> {}",
        rows.len(),
        verdicts.len(),
        counts[0],
        counts[1],
        counts[2],
        o.out.join("report.md").display()
    ))
}

/// Strategy x size: mean over seeds with the lowest and highest seed.
fn strategy_summary(rows: &[Row]) -> String {
    let mut groups: BTreeMap<(String, i64), Vec<&Row>> = BTreeMap::new();
    for r in rows.iter().filter(|r| r.seed().is_some()) {
        groups.entry((r.strategy().to_string(), -(r.f("params").unwrap_or(0.0) as i64))).or_default().push(r);
    }
    if !groups.values().any(|g| g.len() > 1) {
        return String::new();
    }
    let mut md = "\n## Strategies by size, over seeds\n\nMean over seeds (lowest–highest).\n\n".to_string();
    md += "| strategy | params | seeds | perplexity | teacher KL | multiple choice | cloze |\n|---|---:|---:|---:|---:|---:|---:|\n";
    for ((strategy, negp), g) in &groups {
        let cell = |k: &str, scale: f64, digits: usize| {
            let v: Vec<f64> = g.iter().filter_map(|r| r.f(k)).map(|x| x * scale).collect();
            if v.is_empty() {
                return "–".to_string();
            }
            let (lo, hi) = v.iter().fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
            format!("{:.*} ({:.*}–{:.*})", digits, v.iter().sum::<f64>() / v.len() as f64, digits, lo, digits, hi)
        };
        md += &format!(
            "| {strategy} | {} | {} | {} | {} | {} | {} |\n",
            -negp,
            g.len(),
            cell("perplexity", 1.0, 2),
            cell("teacher_kl", 1.0, 4),
            cell("mc_accuracy", 100.0, 1),
            cell("cloze_accuracy", 100.0, 1)
        );
    }
    md
}

/// Every model of another strategy against the `base` model of the same size and seed.
fn strategy_verdicts(rows: &[Row], base: &str, samples: usize, verdicts: &mut Vec<&'static str>) -> String {
    let mut md = format!("\n## Paired verdicts against `{base}` (same size, same seed, same items)\n\n");
    md += "Each cell: difference (model minus baseline), its evidence, then the verdict. Perplexity and KL: 95% paired \
           bootstrap interval over held-out records (lower is better; no significant difference when it covers zero); \
           accuracies: percentage points and McNemar's exact p over the paired items (no significant difference when p >= 0.05).\n\n";
    md += "| model | against | perplexity | teacher KL | multiple choice | cloze |\n|---|---|---|---|---|---|\n";
    let mut any = false;
    for a in rows.iter().filter(|r| r.strategy() != base && !r.is_teacher()) {
        let Some(b) = rows.iter().find(|b| b.strategy() == base && b.f("params") == a.f("params") && b.seed() == a.seed()) else {
            continue;
        };
        any = true;
        let cells: Vec<String> = Metric::TABLE
            .iter()
            .map(|&m| match compare(a, b, m, samples) {
                Ok((p, _)) => {
                    verdicts.push(p.verdict.as_str());
                    let (s, d) = if matches!(m, Metric::Mc | Metric::Cloze) { (100.0, 1) } else { (1.0, if let Metric::TeacherKl = m { 4 } else { 2 }) };
                    let evidence = match (p.p_value, p.interval) {
                        (Some(v), _) => format!(", p = {v:.3}"),
                        (None, Some((lo, hi))) => format!(" [{:+.*}, {:+.*}]", d, lo * s, d, hi * s),
                        (None, None) => String::new(),
                    };
                    format!("{:+.*}{evidence}: **{}**", d, p.diff * s, p.verdict.as_str())
                }
                Err(_) => "–".into(),
            })
            .collect();
        md += &format!("| {} | {} | {} |\n", a.name, b.name, cells.join(" | "));
    }
    if !any {
        md += "| (no model has a baseline of the same size and seed) | | | | | |\n";
    }
    md
}

/// The first `n` generation prompts, with every model's output side by side.
pub(crate) fn sample_table(rows: &[Row], n: usize) -> Vec<(String, Vec<(String, String)>)> {
    let with_gens: Vec<&Row> = rows.iter().filter(|r| r.items.as_ref().is_some_and(|i| !i.generations.is_empty())).collect();
    let Some(first) = with_gens.first() else { return vec![] };
    let prompts = &first.items.as_ref().unwrap().generations;
    prompts
        .iter()
        .take(n)
        .map(|g| {
            let outs = with_gens
                .iter()
                .filter_map(|r| {
                    let o = r.items.as_ref()?.generations.iter().find(|x| x.id == g.id)?;
                    Some((r.name.clone(), o.output.trim().to_string()))
                })
                .collect();
            (g.prompt.trim().to_string(), outs)
        })
        .collect()
}

fn samples_markdown(rows: &[Row], n: usize, which: &str) -> String {
    let table = sample_table(rows, n);
    if table.is_empty() {
        return String::new();
    }
    let mut md = format!("\n## Samples, side by side\n\nGreedy completions of the same prompts ({which}).\n");
    for (i, (prompt, outs)) in table.iter().enumerate() {
        md += &format!("\n**Prompt {}:** {}\n\n| model | completion |\n|---|---|\n", i + 1, prompt.replace('\n', " "));
        for (name, out) in outs {
            md += &format!("| {name} | {} |\n", out.replace('\n', " ").replace('|', "\\|"));
        }
    }
    md
}
