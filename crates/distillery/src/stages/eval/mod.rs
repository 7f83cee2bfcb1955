//! kd-eval: everything a model is judged on. Perplexity (and with a teacher, KL from and
//! top-1 agreement with it; definitions in CONTRACT.md), multiple choice and cloze accuracy,
//! ROUGE-L of generations, side-by-side generations, size, latency, throughput and memory.
//! Every mean comes with a 95% interval (`<metric>_ci95`: Wilson for accuracies, a seeded
//! percentile bootstrap over records or items otherwise), and the per-item outcomes go to a
//! sidecar (`<out>.items.json`) so that kd-report can compare two models over the same items.
pub mod compare;
pub mod judge;
pub mod metrics;
pub mod reference;
pub mod targeted;
pub mod tasks;

use crate::base::device::device_name;
use crate::base::io::{file_fingerprint, files_bytes, write_atomic, write_json_atomic};
use crate::base::journal::Journal;
use crate::base::lock::OutputLock;
use crate::base::stats::{bootstrap_mean_ci, bootstrap_ratio_ci, wilson_interval, BOOTSTRAP_SEED};
use crate::data::encode::{read_tokenized, Layout};
use crate::data::records::{full_text, id_of, read_jsonl, str_field, Record};
use crate::data::shard::Shard;
use crate::model::checkpoint::kind_name;
use crate::model::tokenizer::SpecialTokens;
use crate::teacher::{LocalTeacher, Teacher};
use anyhow::{ensure, Context, Result};
use metrics::{evaluate, EvalMetrics, RecordSums};
use targeted::{targeted_entries, targeted_records, write_answers};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind};

/// What to evaluate and where the results go.
pub struct EvalOptions {
    pub model: String,
    pub teacher: Option<String>,
    pub data: Option<PathBuf>,
    pub mc: Option<PathBuf>,
    pub cloze: Option<PathBuf>,
    pub generate: Option<PathBuf>,
    pub samples_out: Option<PathBuf>,
    /// The teacher's side of the samples, read instead of generated (`id` -> `output`).
    pub teacher_answers: Option<PathBuf>,
    pub out: PathBuf,
    pub csv: Option<PathBuf>,
    pub name: Option<String>,
    pub max_new_tokens: usize,
    /// Render --generate prompts through each model's chat template.
    pub chat_template: bool,
    pub limit: Option<usize>,
    pub speed: bool,
    pub speed_batch: usize,
    /// Rounds of the speed measurement (median and range reported).
    pub speed_repeats: usize,
    /// Label of the curve this model belongs to in kd-report (ce, kd, chain, ...).
    pub strategy: Option<String>,
    /// Bootstrap resamples behind the intervals of perplexity, KL, agreement and ROUGE-L.
    pub bootstrap_samples: usize,
    pub batch_size: usize,
    pub max_length: Option<usize>,
    pub device: Device,
    pub kind: Kind,
    /// Continue the perplexity pass of an interrupted run from its journal.
    pub resume: bool,
    /// The block of --data records this run evaluates (perplexity pass only).
    pub shard: Shard,
    /// A teacher behind a server (instead of `teacher`): KL and agreement from its top-K,
    /// the bucketed approximations of docs/FORMATS.md.
    pub served: Option<crate::teacher::served::ServedTeacher>,
    /// Targeted records (`prompt` with `answer`/`answers` or a long `reference`): exact
    /// match, F1 and contains over short answers, ROUGE-L over long ones, and the judge's grade.
    pub targeted: Option<PathBuf>,
    /// JSONL of the model's answers to the --targeted (else --generate) prompts, for
    /// `--pairwise` to read instead of generating again.
    pub answers_out: Option<PathBuf>,
    /// Grades the --targeted answers against their references.
    pub judge: Option<judge::Judge>,
}

fn limited(path: &Path, limit: Option<usize>) -> Result<Vec<Record>> {
    let mut r = read_jsonl(path)?;
    if let Some(n) = limit {
        r.truncate(n);
    }
    Ok(r)
}

/// Runs every requested evaluation, writes the JSON (and a CSV row); returns a summary line.
/// Bits per byte and per character of the evaluated texts: the total loss in bits over the
/// bytes (characters) the predicted tokens spell, comparable across tokenizers. `None` when
/// a record has no text or its tokens do not spell it exactly (then no figure is honest).
/// The bytes and characters each evaluated record's targets spell (records of two or more
/// tokens, in order); `None` when some record has no text or its tokens do not spell it.
fn covered_text(tok: &crate::model::tokenizer::Tok, texts: &[Option<&String>], seqs: &[Vec<i64>]) -> Result<Option<Vec<(usize, usize)>>> {
    let bytes = crate::model::token_bytes::TokenBytes::of(tok)?;
    let covered: Option<Vec<(usize, usize)>> =
        texts.iter().zip(seqs).filter(|(_, s)| s.len() >= 2).map(|(text, ids)| text.and_then(|t| bytes.covered(ids, t, 1))).collect();
    Ok(covered.filter(|c| c.iter().any(|x| x.0 > 0)))
}

/// Bits per byte and per character, with a bootstrap interval over records, from the
/// per-record sums and the text each record's targets spell; the per-record bytes go into
/// the items (`recs`), so that models with different tokenizers can be compared record by
/// record. kd-merge recombines shards through the same function.
pub fn bits_per_byte_entries(m: &mut Map<String, Value>, recs: &mut Value, e: &EvalMetrics, covered: &[(usize, usize)], b: usize) -> f64 {
    let bits: Vec<f64> = e.per_record.iter().map(|r| r.nll / std::f64::consts::LN_2).collect();
    let bytes: Vec<f64> = covered.iter().map(|c| c.0 as f64).collect();
    let total_bits = e.nll * e.tokens as f64 / std::f64::consts::LN_2;
    let (n_bytes, n_chars) = covered.iter().fold((0, 0), |a, c| (a.0 + c.0, a.1 + c.1));
    let bpb = total_bits / n_bytes as f64;
    m.insert("bits_per_byte".into(), json!(bpb));
    m.insert("bits_per_byte_ci95".into(), json!(bootstrap_ratio_ci(&bits, &bytes, b, BOOTSTRAP_SEED, |x| x)));
    m.insert("bits_per_char".into(), json!(total_bits / n_chars.max(1) as f64));
    recs["bytes"] = json!(covered.iter().map(|c| c.0).collect::<Vec<_>>());
    bpb
}

pub fn run(o: &EvalOptions) -> Result<String> {
    ensure!(o.batch_size > 0, "--batch-size must be positive");
    ensure!(
        o.data.is_some() || o.mc.is_some() || o.cloze.is_some() || o.generate.is_some() || o.targeted.is_some() || o.speed,
        "nothing to evaluate: give --data, --mc, --cloze, --generate, --targeted or --speed"
    );
    ensure!(o.judge.is_none() || o.targeted.is_some(), "--judge grades --targeted answers (or compares --pairwise models): give --targeted");
    if o.shard != Shard::WHOLE {
        ensure!(
            o.data.is_some() && o.mc.is_none() && o.cloze.is_none() && o.generate.is_none() && o.targeted.is_none() && !o.speed && o.csv.is_none(),
            "--shard splits the perplexity pass over --data only: run --mc, --cloze, --generate, --targeted, --speed and --csv unsharded"
        );
    }
    let _lock = OutputLock::acquire(&o.out)?;
    // Read every input before the expensive model loads, so bad input fails fast.
    let mc = o.mc.as_deref().map(|p| limited(p, o.limit)).transpose()?;
    let cloze = o.cloze.as_deref().map(|p| limited(p, o.limit)).transpose()?;
    let gen = o.generate.as_deref().map(|p| limited(p, o.limit)).transpose()?;
    let targeted = o.targeted.as_deref().map(|p| targeted_records(p, o.limit)).transpose()?;
    let (model, files, tok) = crate::model::load(&o.model, o.device, o.kind)?;
    let teacher = match &o.teacher {
        Some(t) => {
            let (m, f, tt) = crate::model::load(t, o.device, o.kind)?;
            Some(LocalTeacher::new(m, f, tt)?)
        }
        None => None,
    };
    let mut teacher_ref: Option<&dyn Teacher> = match (&teacher, &o.served) {
        (Some(t), _) => Some(t),
        (None, Some(s)) => Some(s),
        (None, None) => None,
    };
    // KL and agreement compare distributions over one vocabulary; across tokenizers the
    // comparable figure is bits per byte.
    let mut vocab_note = None;
    if let Some(t) = teacher_ref.filter(|t| t.vocab_size() != model.config.vocab_size) {
        vocab_note = Some(format!(
            "the teacher's vocabulary ({} tokens) differs from the model's ({}): teacher KL, agreement and teacher perplexity \
             are not computed; compare bits_per_byte",
            t.vocab_size(),
            model.config.vocab_size
        ));
        teacher_ref = None;
    }
    let teacher_name = o.teacher.clone().or_else(|| o.served.as_ref().map(|s| format!("{} (served)", s.name())));
    let start = Instant::now();
    let mut m = Map::new();
    let name = o.name.clone().unwrap_or_else(|| o.model.clone());
    m.insert("name".into(), json!(name));
    m.insert("model".into(), json!(o.model));
    m.insert("teacher".into(), json!(teacher_name));
    m.insert("params".into(), json!(model.param_count()));
    m.insert("bytes_on_disk".into(), json!(files_bytes(&files.weights)));
    m.insert("device".into(), json!(device_name(o.device)));
    m.insert("dtype".into(), json!(kind_name(o.kind)));
    m.insert("shape".into(), json!(shape_of(&model.config)));
    m.insert("strategy".into(), json!(o.strategy));
    m.insert("train_seed".into(), json!(train_seed(&o.model)));
    let items_path = items_path(&o.out);
    m.insert("items_file".into(), json!(items_path.file_name().map(|n| n.to_string_lossy().into_owned())));
    let mut items = Map::new();
    let b = o.bootstrap_samples;
    let mut summary = vec![];
    // The speed prompt comes from the evaluated data, never from a fixed text.
    let mut speed_prompt: Option<Vec<i64>> = None;
    // The perplexity pass is the long one: its running sums are journaled.
    let mut finished_journal: Option<Journal> = None;

    if let Some(data) = &o.data {
        let (numbered, toks) = read_tokenized(data, &tok, Layout::Whole, o.max_length)?;
        let n_input = numbered.len();
        let mut seqs: Vec<Vec<i64>> = toks.into_iter().map(|t| t.ids).collect();
        let full_texts: Vec<Option<String>> = numbered.iter().map(|(_, r)| full_text(r).ok()).collect();
        let mut texts: Vec<Option<&String>> = full_texts.iter().map(Option::as_ref).collect();
        let mut ids: Vec<String> = numbered.iter().zip(&seqs).filter(|(_, s)| s.len() >= 2).map(|((_, r), _)| id_of(r).to_string()).collect();
        // A shard evaluates its block of the unsharded run's length-sorted batches (the
        // records passed in file order, so that evaluate() sorts them into the same batches).
        let total = ids.len();
        let positions: Vec<usize> = if o.shard == Shard::WHOLE {
            (0..ids.len()).collect()
        } else {
            texts = texts.into_iter().zip(&seqs).filter(|(_, s)| s.len() >= 2).map(|(t, _)| t).collect();
            seqs.retain(|s| s.len() >= 2);
            let mut order: Vec<usize> = (0..seqs.len()).collect();
            order.sort_by_key(|&i| std::cmp::Reverse(seqs[i].len()));
            let mut mine = order[o.shard.batch_block(order.len(), o.batch_size)?].to_vec();
            mine.sort_unstable();
            seqs = mine.iter().map(|&i| std::mem::take(&mut seqs[i])).collect();
            texts = mine.iter().map(|&i| texts[i]).collect();
            ids = mine.iter().map(|&i| std::mem::take(&mut ids[i])).collect();
            mine
        };
        speed_prompt = seqs.iter().find(|s| s.len() >= 2).map(|s| s[..s.len().min(4)].to_vec());
        let t0 = Instant::now();
        let fingerprint = json!({
            "stage": "kd-eval perplexity",
            "data": file_fingerprint(data)?,
            "model": o.model,
            "teacher": teacher_name,
            "batch_size": o.batch_size,
            "max_length": o.max_length,
            "device": device_name(o.device),
            "dtype": kind_name(o.kind),
            "shard": o.shard.to_string(),
        });
        let mut journal = Journal::open(&o.out, fingerprint, o.resume)?;
        let e = evaluate(&model, teacher_ref, &seqs, o.batch_size, true, Some(&mut journal))?;
        let covered = covered_text(&tok, &texts, &seqs)?;
        if let Some(note) = &vocab_note {
            m.insert("teacher_kl_note".into(), json!(note));
        }
        finished_journal = Some(journal);
        let secs = t0.elapsed().as_secs_f64();
        m.insert("perplexity_seconds".into(), json!(secs));
        m.insert("perplexity_tokens_per_second".into(), json!((e.tokens + e.records as i64) as f64 / secs.max(1e-9)));
        m.insert("data".into(), json!(data.display().to_string()));
        let mut recs = perplexity_entries(&mut m, &e, &ids, b)?;
        if let (Some(c), true) = (&covered, o.shard == Shard::WHOLE) {
            let bpb = bits_per_byte_entries(&mut m, &mut recs, &e, c, b);
            summary.push(format!("{bpb:.4} bits per byte"));
        }
        items.insert("records".into(), recs);
        if o.shard != Shard::WHOLE {
            let settings = json!({
                "model": o.model,
                "teacher": o.teacher,
                "max_length": o.max_length,
                "dtype": kind_name(o.kind),
                "name": name,
                "strategy": o.strategy,
                "bootstrap_samples": b,
                "batch_size": o.batch_size,
            });
            let mut manifest = o.shard.manifest("kd-eval", data, settings, n_input)?;
            let sums: Vec<Value> = e.per_record.iter().enumerate().map(|(i, r)| r.to_json(i)).collect();
            manifest["per_record"] = json!({"ids": ids, "sums": sums});
            manifest["positions"] = json!(positions);
            manifest["total"] = json!(total);
            // The text each of this shard's records' targets spell: kd-merge's bits per byte.
            manifest["text_covered"] = json!(covered);
            m.insert("shard".into(), manifest);
        }
        summary.insert(0, format!("perplexity {:.4} over {} tokens ({} records)", e.perplexity, e.tokens, e.records));
        if let (Some(kl), Some(a)) = (e.teacher_kl, e.top1_agreement) {
            summary.push(format!("teacher KL {kl:.4}, top-1 agreement {:.2}%", 100.0 * a));
        }
    }
    if let Some(recs) = &mc {
        let r = tasks::multiple_choice(&model, &tok, recs, o.batch_size)?;
        m.insert("mc_items".into(), json!(r.items));
        m.insert("mc_accuracy".into(), json!(r.accuracy));
        m.insert("mc_accuracy_ci95".into(), json!(wilson_interval(r.correct.iter().filter(|&&c| c).count(), r.items)));
        m.insert("mc_accuracy_norm".into(), json!(r.accuracy_norm));
        m.insert("mc_accuracy_norm_ci95".into(), json!(wilson_interval((r.accuracy_norm * r.items as f64).round() as usize, r.items)));
        m.insert("mc".into(), json!(o.mc.as_ref().map(|p| p.display().to_string())));
        items.insert("mc".into(), json!({"ids": recs.iter().map(id_of).collect::<Vec<_>>(), "correct": r.correct}));
        summary.push(format!("multiple choice {:.1}% ({} items)", 100.0 * r.accuracy, r.items));
    }
    if let Some(recs) = &cloze {
        let correct = tasks::cloze(&model, &tok, recs, o.batch_size)?;
        let (n, hits) = (correct.len(), correct.iter().filter(|&&c| c).count());
        let acc = hits as f64 / n.max(1) as f64;
        m.insert("cloze_items".into(), json!(n));
        m.insert("cloze_accuracy".into(), json!(acc));
        m.insert("cloze_accuracy_ci95".into(), json!(wilson_interval(hits, n)));
        m.insert("cloze".into(), json!(o.cloze.as_ref().map(|p| p.display().to_string())));
        items.insert("cloze".into(), json!({"ids": recs.iter().map(id_of).collect::<Vec<_>>(), "correct": correct}));
        summary.push(format!("cloze {:.1}% ({n} items)", 100.0 * acc));
    }
    let field = |r: &Record, k: &str| -> Result<String> { Ok(str_field(r, k)?.unwrap_or_default().to_string()) };
    if let Some(recs) = &gen {
        let prompts: Vec<String> = recs.iter().map(|r| field(r, "prompt")).collect::<Result<_>>()?;
        let refs: Vec<String> = recs.iter().map(|r| field(r, "completion")).collect::<Result<_>>()?;
        if speed_prompt.is_none() {
            speed_prompt = prompts.iter().map(|p| tok.encode(p, true)).find(|p| p.as_ref().is_ok_and(|p| !p.is_empty())).transpose()?;
        }
        let eos = SpecialTokens::resolve(&files, &model.config)?.eos;
        let (_, outs) = tasks::greedy_answers(&model, &files, &tok, &eos, &prompts, o.chat_template, o.max_new_tokens, o.batch_size)?;
        let scores: Vec<f64> = outs.iter().zip(&refs).map(|(a, r)| tasks::rouge_l(a, r)).collect();
        let rouge = scores.iter().sum::<f64>() / outs.len().max(1) as f64;
        m.insert("gen_items".into(), json!(outs.len()));
        m.insert("rouge_l".into(), json!(rouge));
        m.insert("rouge_l_ci95".into(), json!(bootstrap_mean_ci(&scores, b, BOOTSTRAP_SEED)));
        m.insert("generate".into(), json!(o.generate.as_ref().map(|p| p.display().to_string())));
        let gens: Vec<Value> = recs
            .iter()
            .zip(prompts.iter().zip(&outs).zip(&refs))
            .map(|(r, ((p, out), rf))| json!({"id": id_of(r), "prompt": p, "output": out, "reference": rf}))
            .collect();
        items.insert("generations".into(), json!(gens));
        summary.push(format!("ROUGE-L {rouge:.3}"));
        // --answers-out takes the --targeted answers when there are some.
        if let (Some(path), None) = (&o.answers_out, &targeted) {
            write_answers(path, recs.iter().map(id_of).zip(prompts.iter().map(String::as_str)), &outs)?;
        }
        if let Some(path) = &o.samples_out {
            let teacher_outs = match (&o.teacher_answers, &teacher) {
                (Some(f), _) => {
                    let mut answers = targeted::read_answers(f)?;
                    let got = recs.iter().map(|r| answers.remove(id_of(r)).with_context(|| format!("{}: no answer for {}", f.display(), id_of(r))));
                    Some(got.collect::<Result<Vec<_>>>()?)
                }
                (None, Some(t)) => Some(
                    tasks::greedy_answers(&t.model, &t.files, &t.tok, &t.special.eos, &prompts, o.chat_template, o.max_new_tokens, o.batch_size)?.1,
                ),
                (None, None) => None,
            };
            let mut md = format!("# Generations: {name}\n\nGreedy, {} new tokens at most.\n\n", o.max_new_tokens);
            for (i, p) in prompts.iter().enumerate() {
                md += &format!("## {}\n\n**Prompt:** {}\n\n", i + 1, p.trim());
                if let Some(t) = &teacher_outs {
                    md += &format!("**Teacher:** {}\n\n", t[i].trim());
                }
                md += &format!("**{name}:** {}\n\n**Reference:** {}\n\n", outs[i].trim(), refs[i].trim());
            }
            write_atomic(path, md.as_bytes())?;
        }
    }
    if let Some(recs) = &targeted {
        let eos = SpecialTokens::resolve(&files, &model.config)?.eos;
        let prompts: Vec<String> = recs.iter().map(|t| t.prompt.clone()).collect();
        let (ids, outs) = tasks::greedy_answers(&model, &files, &tok, &eos, &prompts, o.chat_template, o.max_new_tokens, o.batch_size)?;
        if speed_prompt.is_none() {
            speed_prompt = ids.first().filter(|p| !p.is_empty()).cloned();
        }
        let scores = targeted_entries(&mut m, &mut items, recs, &outs, o.judge.as_ref(), b)?;
        summary.push(scores);
        m.insert("targeted".into(), json!(o.targeted.as_ref().map(|p| p.display().to_string())));
        if let Some(path) = &o.answers_out {
            write_answers(path, recs.iter().map(|t| (t.id.as_str(), t.prompt.as_str())), &outs)?;
        }
    }
    if o.speed {
        let prompt = match (speed_prompt, mc.as_ref().and_then(|r| r.first()), cloze.as_ref().and_then(|r| r.first())) {
            (Some(p), _, _) => p,
            (None, Some(r), _) | (None, None, Some(r)) => tok.encode(&field(r, "prompt")?, true)?,
            // No data at all: the shortest real prompt, a lone start token.
            _ => vec![model.config.bos_token_id.unwrap_or(0)],
        };
        let s = tasks::measure_speed(&model, &prompt, 32, o.speed_batch, o.speed_repeats)?;
        if let Value::Object(obj) = serde_json::to_value(&s)? {
            m.extend(obj);
        }
        summary.push(format!(
            "{:.2} ms/token at batch 1 (median of {}, range {:.2}-{:.2}), {:.0} tokens/s at batch {}",
            s.latency_ms_per_token, s.speed_repeats, s.latency_ms_per_token_range[0], s.latency_ms_per_token_range[1],
            s.throughput_tokens_per_s, s.throughput_batch
        ));
    }
    if let Some(rss) = tasks::peak_rss_bytes() {
        m.insert("peak_rss_bytes".into(), json!(rss));
    }
    m.insert("eval_seconds".into(), json!(start.elapsed().as_secs_f64()));
    m.insert("bootstrap".into(), json!({"samples": b, "seed": BOOTSTRAP_SEED}));
    let value = Value::Object(m);
    // The sidecar first: a metrics file never names an items file that is not there.
    write_json_atomic(&items_path, &Value::Object(items))?;
    write_json_atomic(&o.out, &value)?;
    if let Some(j) = finished_journal {
        j.finish()?;
    }
    if let Some(csv) = &o.csv {
        append_csv_row(csv, &value)?;
    }
    Ok(format!("{}: {}", name, summary.join(", ")))
}

/// The token-weighted metrics of `e` and their intervals into `m`; returns the items file's
/// `records` entry. kd-merge calls it on the recombined sums of the shards.
pub fn perplexity_entries(m: &mut Map<String, Value>, e: &EvalMetrics, ids: &[String], b: usize) -> Result<Value> {
    if let Value::Object(obj) = serde_json::to_value(e)? {
        m.extend(obj);
    }
    let col = |f: fn(&RecordSums) -> f64| e.per_record.iter().map(f).collect::<Vec<f64>>();
    let (nll, count) = (col(|r| r.nll), col(|r| r.count as f64));
    m.insert("perplexity_ci95".into(), json!(bootstrap_ratio_ci(&nll, &count, b, BOOTSTRAP_SEED, f64::exp)));
    let mut recs = json!({"ids": ids, "tokens": count, "nll": nll});
    if e.teacher_kl.is_some() {
        let (kl, agree) = (col(|r| r.kl), col(|r| r.agree));
        m.insert("teacher_kl_ci95".into(), json!(bootstrap_ratio_ci(&kl, &count, b, BOOTSTRAP_SEED, |x| x)));
        m.insert("top1_agreement_ci95".into(), json!(bootstrap_ratio_ci(&agree, &count, b, BOOTSTRAP_SEED, |x| x)));
        recs["kl"] = json!(kl);
        recs["agree"] = json!(agree);
    }
    Ok(recs)
}

/// `<out>.items.json` beside `<out>.json`: the per-item outcomes.
pub fn items_path(out: &Path) -> PathBuf {
    let stem = out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    out.with_file_name(format!("{stem}.items.json"))
}

/// What decides speed: two models with the same shape run the same kernels on the same
/// tensor sizes, so kd-report measures (pools) their speed as one.
fn shape_of(c: &crate::model::ModelConfig) -> String {
    format!(
        "{} layers={} hidden={} heads={}/{} head_dim={} intermediate={} vocab={} tied={}",
        c.spec().model_type, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size,
        c.vocab_size, c.tie_word_embeddings
    )
}

/// The training seed of a model this project trained (its `distill_config.json`).
fn train_seed(model: &str) -> Option<u64> {
    let text = std::fs::read_to_string(Path::new(model).join("distill_config.json")).ok()?;
    serde_json::from_str::<Value>(&text).ok()?.get("seed")?.as_u64()
}

/// The CSV's columns: a fixed order so rows from different runs line up.
const CSV_COLUMNS: &[&str] = &[
    "name", "model", "params", "bytes_on_disk", "perplexity", "teacher_kl", "top1_agreement", "mc_accuracy",
    "mc_accuracy_norm", "cloze_accuracy", "rouge_l", "latency_ms_per_token", "throughput_tokens_per_s", "peak_rss_bytes",
    "device", "dtype",
];

fn append_csv_row(path: &Path, m: &Value) -> Result<()> {
    let existing = std::fs::read(path).unwrap_or_default();
    let mut w = csv::WriterBuilder::new().from_writer(existing.clone());
    if existing.is_empty() {
        w.write_record(CSV_COLUMNS)?;
    }
    let cell = |k: &str| match &m[k] {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    };
    w.write_record(CSV_COLUMNS.iter().map(|k| cell(k)))?;
    write_atomic(path, &w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?)
}
