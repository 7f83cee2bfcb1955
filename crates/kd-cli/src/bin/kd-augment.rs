//! kd-augment: new records from existing ones, each tagged `source: augment:<op>` with its
//! `parent`. Word operations (delete, swap, mask) need no model; teacher operations
//! (infill, paraphrase, backtranslate, resample) generate with `--teacher`.
use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use distillery::augment::{delete_words, fill_template, mask_span, split_for_infill, swap_words};
use distillery::cli;
use distillery::generate::{generate, Sampling};
use distillery::model::CausalLm;
use distillery::records::{id_of, read_jsonl_numbered, str_field, write_jsonl, Record};
use distillery::rng::SplitMix64;
use distillery::tokenizer::{SpecialTokens, Tok};
use serde_json::{json, Value};
use std::path::PathBuf;

const WORD_OPS: &[&str] = &["delete", "swap", "mask"];
const TEACHER_OPS: &[&str] = &["infill", "paraphrase", "backtranslate", "resample"];

#[derive(Parser)]
#[command(about = "Augment records: word deletion/swap/masking, teacher infilling, paraphrase, back-translation, resampling")]
struct Args {
    #[arg(long)]
    data: PathBuf,
    #[arg(long)]
    out: PathBuf,
    /// Operations: delete, swap, mask, infill, paraphrase, backtranslate, resample.
    #[arg(long, value_delimiter = ',', required = true)]
    ops: Vec<String>,
    /// Needed by infill, paraphrase, backtranslate and resample.
    #[arg(long)]
    teacher: Option<String>,
    /// New records per input record and operation (resample: per temperature).
    #[arg(long, default_value_t = 1)]
    per_record: usize,
    /// Fraction of the words an operation touches.
    #[arg(long, default_value_t = 0.15)]
    ratio: f64,
    /// Fraction of input records that get augmented (chosen by the seed).
    #[arg(long, default_value_t = 1.0)]
    fraction: f64,
    #[arg(long, default_value = "<mask>")]
    mask_token: String,
    /// Prompt templates for paraphrase and back-translation (JSON with `paraphrase`,
    /// `to_pivot`, `from_pivot`, each containing `{text}`).
    #[arg(long, default_value = "pipelines/templates/augment.json")]
    templates: PathBuf,
    /// Sampling temperature of teacher operations (0 = greedy).
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    /// Temperatures for `resample`.
    #[arg(long, value_delimiter = ',', default_value = "0.7,1.3")]
    temperatures: Vec<f64>,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Leave the input records out of the output (by default they come first).
    #[arg(long)]
    no_originals: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    #[arg(long, default_value = "auto")]
    device: String,
    #[arg(long, default_value = "auto")]
    dtype: String,
}

fn main() {
    cli::run("kd-augment", || run(Args::parse()));
}

/// The field an operation rewrites: `text`, else `completion`, else `prompt`.
fn target_field(rec: &Record) -> Option<&'static str> {
    ["text", "completion", "prompt"].into_iter().find(|k| matches!(rec.get(*k), Some(Value::String(_))))
}

/// A derived record: the parent's fields minus those that described the old text.
fn derive(parent: &Record, op: &str, k: usize, field: &str, text: String) -> Record {
    let mut r = parent.clone();
    for stale in ["prompt_ids", "completion_ids", "teacher_logits", "scores", "hard_tokens"] {
        r.remove(stale);
    }
    r.insert("id".into(), json!(format!("{}#{op}{k}", id_of(parent))));
    r.insert("parent".into(), json!(id_of(parent)));
    r.insert("source".into(), json!(format!("augment:{op}")));
    r.insert(field.into(), json!(text));
    r
}

struct TeacherGen<'a> {
    model: &'a CausalLm,
    tok: &'a Tok,
    eos: Vec<i64>,
    args: &'a Args,
}

impl TeacherGen<'_> {
    /// Completions for `(prompt, rng key, temperature)` jobs, batched.
    fn run(&self, jobs: &[(String, u64, f64)]) -> Result<Vec<String>> {
        let mut out = vec![String::new(); jobs.len()];
        let mut progress = distillery::runtime::Progress::new("augment", jobs.len() as u64);
        let mut order: Vec<usize> = (0..jobs.len()).collect();
        // Same temperature together (one Sampling per batch).
        order.sort_by(|&a, &b| jobs[a].2.total_cmp(&jobs[b].2));
        for chunk in order.chunk_by(|&a, &b| jobs[a].2 == jobs[b].2) {
            for batch in chunk.chunks(self.args.batch_size.max(1)) {
                let prompts: Vec<Vec<i64>> = batch.iter().map(|&j| self.tok.encode(&jobs[j].0, true)).collect::<Result<_>>()?;
                let s = Sampling {
                    max_new_tokens: self.args.max_new_tokens,
                    temperature: jobs[batch[0]].2,
                    top_k: None,
                    top_p: None,
                    eos: self.eos.clone(),
                    pad: 0,
                };
                let mut rngs: Vec<SplitMix64> = batch.iter().map(|&j| SplitMix64::for_key(self.args.seed, jobs[j].1)).collect();
                for (&j, ids) in batch.iter().zip(generate(self.model, &prompts, &s, &mut rngs)?) {
                    out[j] = self.tok.decode(&ids, true)?;
                }
                progress.inc(batch.len() as u64, "");
            }
        }
        progress.finish();
        Ok(out)
    }
}

/// The first line of a generation, trimmed (templates ask for one line).
fn first_line(s: &str) -> String {
    s.trim_start().lines().next().unwrap_or("").trim().to_string()
}

fn key(rec_idx: usize, op_idx: usize, k: usize) -> u64 {
    ((rec_idx as u64) << 24) ^ ((op_idx as u64) << 16) ^ k as u64
}

fn run(args: Args) -> Result<()> {
    for op in &args.ops {
        ensure!(WORD_OPS.contains(&op.as_str()) || TEACHER_OPS.contains(&op.as_str()), "unknown op `{op}` (ops: {}, {})", WORD_OPS.join(", "), TEACHER_OPS.join(", "));
    }
    ensure!(args.ratio > 0.0 && args.ratio <= 1.0, "--ratio must be in (0, 1]");
    ensure!((0.0..=1.0).contains(&args.fraction), "--fraction must be in [0, 1]");
    let needs_teacher = args.ops.iter().any(|o| TEACHER_OPS.contains(&o.as_str()));
    if needs_teacher && args.teacher.is_none() {
        bail!("ops {} need --teacher", TEACHER_OPS.join(", "));
    }
    let templates: Value = if args.ops.iter().any(|o| o == "paraphrase" || o == "backtranslate") {
        let t: Value = serde_json::from_str(&std::fs::read_to_string(&args.templates).with_context(|| format!("reading {}", args.templates.display()))?)
            .with_context(|| format!("{}: invalid JSON", args.templates.display()))?;
        for k in ["paraphrase", "to_pivot", "from_pivot"] {
            ensure!(t.get(k).and_then(Value::as_str).is_some_and(|s| s.contains("{text}")), "{}: `{k}` must be a string containing {{text}}", args.templates.display());
        }
        t
    } else {
        Value::Null
    };
    let numbered = read_jsonl_numbered(&args.data)?;
    let loaded = match &args.teacher {
        Some(t) if needs_teacher => {
            let (device, kind) = cli::device_and_kind(&args.device, &args.dtype)?;
            let (m, files, tok) = cli::load(t, device, kind)?;
            let eos = SpecialTokens::resolve(&files, &m.config)?.eos;
            Some((m, tok, eos))
        }
        _ => None,
    };
    let gen = loaded.as_ref().map(|(m, tok, eos)| TeacherGen { model: m, tok, eos: eos.clone(), args: &args });
    let mut pick = SplitMix64::for_key(args.seed, u64::MAX);
    let chosen: Vec<bool> = numbered.iter().map(|_| pick.next_f64() < args.fraction).collect();

    let mut made: Vec<(usize, usize, usize, Record)> = vec![]; // (record, op, k) for ordering
    for (op_idx, op) in args.ops.iter().enumerate() {
        let mut jobs: Vec<(String, u64, f64)> = vec![];
        let mut pending: Vec<(usize, usize, String, String, String)> = vec![]; // rec, k, field, prefix, suffix
        for (ri, (line, rec)) in numbered.iter().enumerate() {
            if !chosen[ri] {
                continue;
            }
            let Some(field) = target_field(rec) else {
                bail!("{}:{line}: record `{}` has no text, completion or prompt to augment", args.data.display(), id_of(rec));
            };
            let text = str_field(rec, field)?.unwrap_or_default().to_string();
            let ks: Vec<usize> = if op == "resample" { (0..args.per_record * args.temperatures.len()).collect() } else { (0..args.per_record).collect() };
            for k in ks {
                let mut rng = SplitMix64::for_key(args.seed, key(ri, op_idx, k));
                match op.as_str() {
                    "delete" => made.push((ri, op_idx, k, derive(rec, op, k, field, delete_words(&text, args.ratio, &mut rng)))),
                    "swap" => made.push((ri, op_idx, k, derive(rec, op, k, field, swap_words(&text, args.ratio, &mut rng)))),
                    "mask" => made.push((ri, op_idx, k, derive(rec, op, k, field, mask_span(&text, args.ratio, &args.mask_token, &mut rng)))),
                    "infill" => {
                        let (prefix, span, suffix) = split_for_infill(&text, args.ratio, &mut rng);
                        let n = span.split_whitespace().count();
                        jobs.push((prefix.clone(), key(ri, op_idx, k), args.temperature));
                        pending.push((ri, k, field.into(), prefix, format!("{n}\u{0}{suffix}")));
                    }
                    "paraphrase" => {
                        jobs.push((fill_template(templates["paraphrase"].as_str().unwrap(), &text), key(ri, op_idx, k), args.temperature));
                        pending.push((ri, k, field.into(), String::new(), String::new()));
                    }
                    "backtranslate" => {
                        jobs.push((fill_template(templates["to_pivot"].as_str().unwrap(), &text), key(ri, op_idx, k), args.temperature));
                        pending.push((ri, k, field.into(), String::new(), String::new()));
                    }
                    "resample" => {
                        // Only prompt records can be resampled; text records are left alone.
                        let Some(prompt) = str_field(rec, "prompt")? else { continue };
                        let t = args.temperatures[k % args.temperatures.len()];
                        jobs.push((prompt.to_string(), key(ri, op_idx, k), t));
                        pending.push((ri, k, "completion".into(), String::new(), t.to_string()));
                    }
                    _ => unreachable!(),
                }
            }
        }
        if jobs.is_empty() {
            continue;
        }
        let g = gen.as_ref().unwrap();
        let mut outs = g.run(&jobs)?;
        if op == "backtranslate" {
            let back: Vec<(String, u64, f64)> = outs
                .iter()
                .zip(&jobs)
                .map(|(o, j)| (fill_template(templates["from_pivot"].as_str().unwrap(), &first_line(o)), j.1 ^ 0xb7, j.2))
                .collect();
            outs = g.run(&back)?;
        }
        for ((ri, k, field, prefix, extra), o) in pending.into_iter().zip(outs) {
            let rec = &numbered[ri].1;
            let new = match op.as_str() {
                "infill" => {
                    let (n, suffix) = extra.split_once('\u{0}').unwrap();
                    let fill: Vec<&str> = o.split_whitespace().take(n.parse().unwrap_or(1)).collect();
                    [prefix.as_str(), &fill.join(" "), suffix].iter().filter(|s| !s.is_empty()).copied().collect::<Vec<_>>().join(" ")
                }
                "resample" => o.clone(),
                _ => first_line(&o),
            };
            let mut r = derive(rec, op, k, &field, new);
            if op == "resample" {
                r.insert("teacher".into(), json!({"model": args.teacher, "temperature": extra.parse::<f64>().unwrap_or(1.0), "seed": args.seed}));
            }
            made.push((ri, op_idx, k, r));
        }
    }
    made.sort_by_key(|m| (m.0, m.1, m.2));
    let mut out: Vec<Record> = if args.no_originals { vec![] } else { numbered.iter().map(|(_, r)| r.clone()).collect() };
    let n_new = made.len();
    out.extend(made.into_iter().map(|m| m.3));
    ensure!(!out.is_empty(), "nothing to write: no records were augmented and --no-originals is set");
    write_jsonl(&args.out, &out)?;
    println!("{} new records from {} ({}) -> {}", n_new, numbered.len(), args.ops.join(","), args.out.display());
    Ok(())
}
