//! `kd-eval --pairwise A B --judge J --prompts FILE`: both models' answers to the same
//! prompts (generated here, or read from answers files), compared by the judge in both
//! orders; win, tie and loss rates with intervals, and every reading kept for audit.
use super::judge::{pairwise, Judge, PairItem};
use super::targeted::{read_answers, targeted_records};
use super::{items_path, tasks};
use crate::base::io::{write_atomic, write_json_atomic};
use crate::base::lock::OutputLock;
use crate::model::tokenizer::SpecialTokens;
use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use tch::{Device, Kind};

pub struct PairwiseOptions {
    pub judge: Judge,
    /// Each side: a model (directory, hub id, .gguf) or a `.jsonl` answers file.
    pub sides: [String; 2],
    pub names: [String; 2],
    pub prompts: PathBuf,
    pub out: PathBuf,
    /// Markdown of the pairs side by side with the judge's verdicts.
    pub samples_out: Option<PathBuf>,
    pub chat_template: bool,
    pub max_new_tokens: usize,
    pub limit: Option<usize>,
    pub batch_size: usize,
    pub bootstrap_samples: usize,
    pub device: Device,
    pub kind: Kind,
}

/// True when a side names an answers file rather than a model.
pub fn is_answers_file(side: &str) -> bool {
    side.ends_with(".jsonl") && Path::new(side).is_file()
}

fn answers(o: &PairwiseOptions, side: &str, ids: &[String], prompts: &[String]) -> Result<Vec<String>> {
    if is_answers_file(side) {
        let by_id = read_answers(Path::new(side))?;
        return ids
            .iter()
            .map(|id| by_id.get(id).cloned().with_context(|| format!("{side}: no answer for prompt {id} of {}", o.prompts.display())))
            .collect();
    }
    let (model, files, tok) = crate::model::load(side, o.device, o.kind)?;
    let eos = SpecialTokens::resolve(&files, &model.config)?.eos;
    Ok(tasks::greedy_answers(&model, &files, &tok, &eos, prompts, o.chat_template, o.max_new_tokens, o.batch_size)?.1)
}

pub fn run_pairwise(o: &PairwiseOptions) -> Result<String> {
    ensure!(o.names[0] != o.names[1], "--pairwise: both sides are named {:?}; name them apart with --pairwise-names", o.names[0]);
    let _lock = OutputLock::acquire(&o.out)?;
    let recs = targeted_records(&o.prompts, o.limit)?;
    let ids: Vec<String> = recs.iter().map(|r| r.id.clone()).collect();
    let prompts: Vec<String> = recs.iter().map(|r| r.prompt.clone()).collect();
    let a = answers(o, &o.sides[0], &ids, &prompts)?;
    let b = answers(o, &o.sides[1], &ids, &prompts)?;
    let items: Vec<PairItem> = (0..recs.len())
        .map(|i| PairItem { id: ids[i].clone(), question: prompts[i].clone(), answer_a: a[i].trim().to_string(), answer_b: b[i].trim().to_string() })
        .collect();
    let (mut summary, rows) = pairwise(&o.judge, &items, [&o.names[0], &o.names[1]], o.bootstrap_samples)?;
    summary["name"] = json!(format!("{} vs {}", o.names[0], o.names[1]));
    summary["sides"] = json!(o.sides);
    summary["prompts"] = json!(o.prompts.display().to_string());
    summary["generation"] = json!({"max_new_tokens": o.max_new_tokens, "chat_template": o.chat_template, "decoding": "greedy"});
    summary["bootstrap"] = json!({"samples": o.bootstrap_samples, "seed": crate::base::stats::BOOTSTRAP_SEED});
    let items_file = items_path(&o.out);
    summary["items_file"] = json!(items_file.file_name().map(|n| n.to_string_lossy().into_owned()));
    if let Some(path) = &o.samples_out {
        write_atomic(path, samples_markdown(&summary, &rows).as_bytes())?;
    }
    write_json_atomic(&items_file, &json!({"pairwise": rows}))?;
    write_json_atomic(&o.out, &summary)?;
    let pct = |k: &str| 100.0 * summary[k].as_f64().unwrap_or(0.0);
    Ok(format!(
        "{} vs {} judged by {} on {} prompts: {} wins {:.1}%, {} wins {:.1}%, ties {:.1}%; the judge agreed with itself across orders on {:.1}%",
        o.names[0], o.names[1], summary["judge"].as_str().unwrap_or_default(), items.len(), o.names[0], pct("win_rate_a"), o.names[1],
        pct("win_rate_b"), pct("tie_rate"), pct("self_agreement")
    ))
}

/// The pairs side by side, each with the combined verdict and both orders' readings.
pub fn samples_markdown(summary: &Value, rows: &[Value]) -> String {
    let (a, b) = (summary["a"].as_str().unwrap_or("A"), summary["b"].as_str().unwrap_or("B"));
    let mut md = format!(
        "# {a} against {b}, judged by {}\n\nGreedy answers; the judge is asked in both orders (disagreements are ties).\n\n",
        summary["judge"].as_str().unwrap_or_default()
    );
    for (i, r) in rows.iter().enumerate() {
        let who = |w: &Value| match w.as_str() {
            Some("a") => a.to_string(),
            Some("b") => b.to_string(),
            _ => "tie".to_string(),
        };
        let orders: Vec<String> = r["orders"]
            .as_array()
            .map(|os| os.iter().map(|o| format!("{} shown first: {:?} ({})", who(&o["shown_first"]), o["label"].as_str().unwrap_or_default(), who(&o["winner"]))).collect())
            .unwrap_or_default();
        md += &format!(
            "## {} ({})\n\n**Prompt:** {}\n\n**{a}:** {}\n\n**{b}:** {}\n\n**Judge:** {} ({})\n\n",
            i + 1,
            r["id"].as_str().unwrap_or_default(),
            r["prompt"].as_str().unwrap_or_default().trim(),
            r["answer_a"].as_str().unwrap_or_default(),
            r["answer_b"].as_str().unwrap_or_default(),
            match r["winner"].as_str() {
                Some("tie") => "tie".to_string(),
                _ => format!("{} wins", who(&r["winner"])),
            },
            orders.join("; ")
        );
    }
    md
}
