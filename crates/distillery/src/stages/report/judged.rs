//! The report's targeted-set table (kd-eval --targeted) and judge section (kd-eval
//! --pairwise): win, tie and loss rates with intervals, the judge's self-agreement across
//! orders, and the first pairs side by side with their verdicts.
use super::{verdict_text, with_ci, Metric, Row};
use anyhow::{Context, Result};
use serde_json::Value;
use std::path::PathBuf;

/// Targeted-set scores of every model that has them, and the student against the baseline.
pub(super) fn targeted_section(rows: &[Row], pair: Option<(&str, &str)>, samples: usize, verdicts: &mut Vec<&'static str>) -> String {
    let with: Vec<&Row> = rows.iter().filter(|r| r.f("targeted_items").is_some()).collect();
    let Some(first) = with.first() else { return String::new() };
    let mut md = format!(
        "\n## Targeted set ({})\n\nGreedy answers scored against reference answers: exact match and F1 as the SQuAD script \
         computes them, \"contains\" when the reference's words appear in the answer in order (instruction models answer in \
         sentences), ROUGE-L against long references, and the judge's grade (correct 1, partially 0.5, wrong 0). 95% bootstrap \
         intervals over prompts.\n\n",
        first.s("targeted").unwrap_or("--targeted")
    );
    md += "| model | prompts | exact match | F1 | contains | ROUGE-L (long) | judge grade |\n|---|---:|---:|---:|---:|---:|---:|\n";
    for r in with {
        md += &format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            r.name,
            r.v["targeted_items"],
            with_ci(r, "targeted_exact_match", 1, 100.0, "%"),
            with_ci(r, "targeted_f1", 1, 100.0, "%"),
            with_ci(r, "targeted_contains_answer", 1, 100.0, "%"),
            with_ci(r, "targeted_reference_rouge_l", 3, 1.0, ""),
            with_ci(r, "targeted_judge_grade", 3, 1.0, ""),
        );
    }
    let find = |n: &str| rows.iter().find(|r| r.name == n);
    if let Some((s, b)) = pair.and_then(|(s, b)| find(s).zip(find(b))) {
        let (line, v) = verdict_text(s, b, Metric::TargetedContains, samples);
        md += &format!("\n* {}: {line}.\n", Metric::TargetedContains.label());
        verdicts.extend(v);
    }
    md
}

fn pct(v: &Value, k: &str) -> String {
    let ci = v[format!("{k}_ci95")].as_array().and_then(|a| Some((a.first()?.as_f64()?, a.get(1)?.as_f64()?)));
    match (v[k].as_f64(), ci) {
        (Some(x), Some((lo, hi))) => format!("{:.1}% [{:.1}, {:.1}]", 100.0 * x, 100.0 * lo, 100.0 * hi),
        (Some(x), None) => format!("{:.1}%", 100.0 * x),
        _ => "–".into(),
    }
}

/// One row per pairwise judgement, a verdict on each, and the first pairs side by side.
pub(super) fn judge_section(paths: &[PathBuf], verdicts: &mut Vec<&'static str>) -> Result<String> {
    if paths.is_empty() {
        return Ok(String::new());
    }
    let mut md = "\n## Judged answers, pairwise\n\nThe judge compares two models' greedy answers to the same prompt, asked in both \
                  orders; the same winner twice wins, anything else is a tie. Score: a win counts 1, a tie 1/2 (0.5 is no \
                  preference; the verdict is \"better\" or \"worse\" when its 95% bootstrap interval over prompts excludes 0.5). \
                  Self-agreement: how often the two orders gave the same verdict; first position: how often the judge picked \
                  the answer shown first.\n\n"
        .to_string();
    md += "| A | B | judge | prompts | A wins | B wins | ties | score of A | verdict on A | self-agreement | first position |\n\
           |---|---|---|---:|---:|---:|---:|---:|---|---:|---:|\n";
    let mut shown = String::new();
    for p in paths {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)
            .with_context(|| format!("{}: not JSON", p.display()))?;
        anyhow::ensure!(v["kind"] == "pairwise", "{}: not a kd-eval --pairwise result", p.display());
        let ci = v["score_a_ci95"].as_array().and_then(|a| Some((a.first()?.as_f64()?, a.get(1)?.as_f64()?)));
        let verdict = match ci {
            Some((lo, _)) if lo > 0.5 => "better",
            Some((_, hi)) if hi < 0.5 => "worse",
            _ => "no significant difference",
        };
        verdicts.push(verdict);
        let (a, b) = (v["a"].as_str().unwrap_or("A"), v["b"].as_str().unwrap_or("B"));
        md += &format!(
            "| {a} | {b} | {} | {} | {} | {} | {} | {:.3} [{:.3}, {:.3}] | **{verdict}** | {} | {} |\n",
            v["judge"].as_str().unwrap_or_default(),
            v["items"],
            format!("{} ({})", v["wins_a"], pct(&v, "win_rate_a")),
            format!("{} ({})", v["wins_b"], pct(&v, "win_rate_b")),
            format!("{} ({})", v["ties"], pct(&v, "tie_rate")),
            v["score_a"].as_f64().unwrap_or(f64::NAN),
            ci.map_or(f64::NAN, |c| c.0),
            ci.map_or(f64::NAN, |c| c.1),
            pct(&v, "self_agreement"),
            pct(&v, "first_position_rate"),
        );
        // The first pairs with their verdicts, from the sidecar.
        let items = p.with_file_name(v["items_file"].as_str().unwrap_or_default());
        if let Some(rows) = std::fs::read_to_string(&items).ok().and_then(|t| serde_json::from_str::<Value>(&t).ok()) {
            shown += &format!("\n**{a} against {b}** (the first 3 prompts; every pair and reading in `{}`):\n\n", items.file_name().unwrap_or_default().to_string_lossy());
            shown += &format!("| prompt | {a} | {b} | judge |\n|---|---|---|---|\n");
            for r in rows["pairwise"].as_array().into_iter().flatten().take(3) {
                let cell = |k: &str| r[k].as_str().unwrap_or_default().replace('\n', " ").replace('|', "\\|");
                let w = match r["winner"].as_str() {
                    Some("a") => format!("{a} wins"),
                    Some("b") => format!("{b} wins"),
                    _ => "tie".into(),
                };
                shown += &format!("| {} | {} | {} | {w} |\n", cell("prompt"), cell("answer_a"), cell("answer_b"));
            }
        }
    }
    Ok(md + &shown)
}
