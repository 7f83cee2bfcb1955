//! kd-merge: joins the outputs of a stage run as `--shard I/N` into what the unsharded run
//! writes, byte for byte: records in unsharded order, the logits sidecar with its pointers
//! renumbered, and the summary recomputed from the shards' exact parts (kd-filter's
//! selection and histograms over the joined scores, kd-eval's token-weighted metrics from
//! the per-record sums, never an average of averages).
//!
//! Each shard's manifest (`shard` in `<shard>.summary.json`, or in kd-eval's metrics file
//! itself) names the stage, `I/N`, the input's fingerprint and the settings; shards whose
//! manifests disagree, a missing or repeated shard, and lines that do not match their
//! manifest are refused with a message naming the files.
use crate::base::io::write_json_atomic;
use crate::base::lock::OutputLock;
use crate::data::records::{full_text, parse_strict, write_lines, Record};
use crate::data::shard::summary_path;
use crate::data::teacher_logits::{sidecar_path_for, sidecar_stats, LogitsFormat, LogitsWriter, TopRows};
use crate::data::topk_compact::{self, CompactFile};
use crate::stages::eval::metrics::{EvalMetrics, RecordSums};
use crate::stages::filter::selection::{select, Rules, SCORE_NAMES};
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};

/// One shard's output, its summary and its manifest.
struct Part {
    path: PathBuf,
    summary: Value,
    manifest: Value,
}

impl Part {
    fn load(path: &Path) -> Result<Part> {
        let beside = summary_path(path);
        let (from, text) = if beside.exists() {
            (beside.clone(), std::fs::read_to_string(&beside).with_context(|| format!("reading {}", beside.display()))?)
        } else {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            (path.to_path_buf(), text)
        };
        let summary: Value = match serde_json::from_str(&text) {
            Ok(v) => v,
            Err(_) if from == path => bail!(
                "{}: no summary beside it ({}); kd-merge joins the outputs of runs made with --shard",
                path.display(),
                beside.display()
            ),
            Err(e) => bail!("{}: malformed JSON: {e}", from.display()),
        };
        let Some(manifest) = summary.get("shard").cloned() else {
            bail!("{}: no `shard` manifest in {}; kd-merge joins the outputs of runs made with --shard", path.display(), from.display());
        };
        Ok(Part { path: path.to_path_buf(), summary, manifest })
    }

    fn index(&self) -> usize {
        self.manifest["index"].as_u64().unwrap_or(u64::MAX) as usize
    }

    fn lines(&self) -> Result<Vec<String>> {
        let text = std::fs::read_to_string(&self.path).with_context(|| format!("reading {}", self.path.display()))?;
        Ok(text.lines().filter(|l| !l.trim().is_empty()).map(str::to_string).collect())
    }

    /// Each output line's position in the unsharded output.
    fn positions(&self) -> Result<Vec<usize>> {
        let p = self.manifest["positions"].as_array().with_context(|| format!("{}: the manifest has no `positions`", self.path.display()))?;
        p.iter().map(|v| v.as_u64().map(|x| x as usize).with_context(|| format!("{}: a position is not a number", self.path.display()))).collect()
    }
}

/// Checks that the shards are one run's: same stage, count, input and settings, each index
/// once and none missing; returns them in index order.
fn check(mut parts: Vec<Part>) -> Result<Vec<Part>> {
    ensure!(!parts.is_empty(), "no shards given");
    let first = &parts[0];
    let label = |p: &Part| format!("{}", p.path.display());
    for p in &parts[1..] {
        for key in ["stage", "count", "input_fingerprint", "input_records"] {
            ensure!(
                p.manifest[key] == first.manifest[key],
                "{} and {} are not shards of one run: their {key} differs ({} vs {})",
                label(first),
                label(p),
                first.manifest[key],
                p.manifest[key]
            );
        }
        if p.manifest["settings"] != first.manifest["settings"] {
            let (a, b) = (&first.manifest["settings"], &p.manifest["settings"]);
            let keys: Vec<String> = match (a.as_object(), b.as_object()) {
                (Some(x), Some(y)) => x.keys().chain(y.keys()).filter(|k| x.get(*k) != y.get(*k)).cloned().collect(),
                _ => vec!["settings".into()],
            };
            let k = keys.first().cloned().unwrap_or_default();
            bail!("{} and {} were made with different settings: `{k}` is {} vs {}", label(first), label(p), a[&k], b[&k]);
        }
    }
    let count = first.manifest["count"].as_u64().context("the manifest has no shard count")? as usize;
    let mut by_index: Vec<Option<usize>> = vec![None; count];
    for (i, p) in parts.iter().enumerate() {
        let idx = p.index();
        ensure!(idx < count, "{}: shard index {idx} is not below the count {count}", label(p));
        if let Some(j) = by_index[idx] {
            bail!("shard {idx}/{count} is given twice: {} and {}", label(&parts[j]), label(p));
        }
        by_index[idx] = Some(i);
    }
    let missing: Vec<String> = (0..count).filter(|&i| by_index[i].is_none()).map(|i| format!("{i}/{count}")).collect();
    ensure!(missing.is_empty(), "shard{} {} missing: all {count} shards are needed", if missing.len() > 1 { "s" } else { "" }, missing.join(", "));
    parts.sort_by_key(Part::index);
    Ok(parts)
}

/// Every item of every shard with its position, in unsharded order; each position of
/// `0..total` exactly once.
fn in_order<T>(parts: &[Part], items: Vec<Vec<T>>) -> Result<Vec<T>> {
    let total = parts[0].manifest["total"].as_u64().context("the manifest has no `total`")? as usize;
    let mut slots: Vec<Option<(T, usize)>> = (0..total).map(|_| None).collect();
    for (s, (p, its)) in parts.iter().zip(items).enumerate() {
        let pos = p.positions()?;
        ensure!(pos.len() == its.len(), "{}: {} items but its manifest lists {} positions", p.path.display(), its.len(), pos.len());
        for (at, item) in pos.into_iter().zip(its) {
            ensure!(at < total, "{}: position {at} is outside the run's {total}", p.path.display());
            if let Some((_, other)) = &slots[at] {
                bail!("position {at} of the output is in both {} and {}", parts[*other].path.display(), p.path.display());
            }
            slots[at] = Some((item, s));
        }
    }
    if let Some(gap) = slots.iter().position(Option::is_none) {
        bail!("position {gap} of the output is in no shard (were the shards made from the same run?)");
    }
    Ok(slots.into_iter().map(|s| s.unwrap().0).collect())
}

/// Joins the shards into `out`; returns the summary line.
pub fn run(out: &Path, shards: &[PathBuf]) -> Result<String> {
    ensure!(!shards.is_empty(), "give the shard outputs to join");
    for s in shards {
        ensure!(s.as_path() != out, "--out {} is one of the shards", out.display());
    }
    let parts = check(shards.iter().map(|p| Part::load(p)).collect::<Result<_>>()?)?;
    let _lock = OutputLock::acquire(out)?;
    let stage = parts[0].manifest["stage"].as_str().unwrap_or_default().to_string();
    let n = parts.len();
    let line = match stage.as_str() {
        "kd-generate" => generate(out, &parts)?,
        "kd-filter" => filter(out, &parts)?,
        "kd-eval" => eval(out, &parts)?,
        "kd-augment" => augment(out, &parts)?,
        other => bail!("{}: shards of `{other}` cannot be joined", parts[0].path.display()),
    };
    Ok(format!("{stage}: joined {n} shards; {line}"))
}

/// The `teacher_logits` pointer of a record line, and the line with it replaced by `new`
/// (the rest of the line stays byte for byte).
pub(crate) fn repoint(line: &str, new: &Value) -> Result<String> {
    let rec: Value = parse_strict(line).context("malformed JSON")?;
    let old = rec.get("teacher_logits").context("no `teacher_logits` pointer")?;
    let needle = format!("\"teacher_logits\":{}", serde_json::to_string(old)?);
    ensure!(line.matches(&needle).count() == 1, "its `teacher_logits` pointer is not written as kd-generate writes it");
    Ok(line.replacen(&needle, &format!("\"teacher_logits\":{}", serde_json::to_string(new)?), 1))
}

fn pointer_rows(line: &str) -> Result<(i64, i64)> {
    let rec: Value = parse_strict(line).context("malformed JSON")?;
    let p = &rec["teacher_logits"];
    Ok((p["row"].as_i64().context("no `teacher_logits.row`")?, p["rows"].as_i64().context("no `teacher_logits.rows`")?))
}

fn generate(out: &Path, parts: &[Part]) -> Result<String> {
    let settings = &parts[0].manifest["settings"];
    let mode = parts[0].summary["mode"].as_str().unwrap_or("generate").to_string();
    let teacher = parts[0].summary["teacher"].as_str().unwrap_or_default().to_string();
    let k = settings["store_logits"].as_i64();
    let lines = in_order(parts, parts.iter().enumerate().map(|(s, p)| Ok(p.lines()?.into_iter().map(|l| (s, l)).collect())).collect::<Result<_>>()?)?;
    let tokens: usize = parts.iter().map(|p| p.summary["tokens"].as_u64().unwrap_or(0) as usize).sum();
    let mut joined = Vec::with_capacity(lines.len());
    let format = match settings["logits_format"].as_str() {
        Some(f) => f.parse::<LogitsFormat>()?,
        None => LogitsFormat::Safetensors,
    };
    let logits = match k {
        Some(k) => {
            let file = sidecar_path_for(out, format);
            let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let mut writer = LogitsWriter::with_format(k, format);
            let paths: Vec<PathBuf> = parts.iter().map(|p| sidecar_path_for(&p.path, format)).collect();
            let mut dense: Vec<Option<TopRows>> = (0..parts.len()).map(|_| None).collect();
            let mut compact: Vec<Option<CompactFile>> = (0..parts.len()).map(|_| None).collect();
            for (s, line) in &lines {
                let ctx = || format!("{}: record {}", parts[*s].path.display(), id_in(line));
                let (row, n) = pointer_rows(line).with_context(ctx)?;
                let mut p = match format {
                    LogitsFormat::Safetensors => {
                        if dense[*s].is_none() {
                            dense[*s] = Some(TopRows::read(&paths[*s])?);
                        }
                        let rows = dense[*s].as_ref().unwrap();
                        let have = rows.rows();
                        ensure!(row >= 0 && n >= 0 && row + n <= have, "{}: its rows {row}..{} are outside the shard's sidecar ({have} rows)", ctx(), row + n);
                        writer.push_rows(rows.narrow(row, n))
                    }
                    LogitsFormat::Compact => {
                        if compact[*s].is_none() {
                            compact[*s] = Some(CompactFile::open(&paths[*s])?);
                        }
                        let c = compact[*s].as_mut().unwrap();
                        ensure!(row >= 0 && n >= 0, "{}: negative rows", ctx());
                        let b = c.find(row as u64, n as u64).with_context(ctx)?;
                        if c.coding.version == topk_compact::VERSION {
                            writer.push_block(n as u32, c.block(b).with_context(ctx)?)?
                        } else {
                            // An older version's blocks are coded for its own header: recode.
                            writer.push_rows(TopRows::from_plain(&c.rows(b).with_context(ctx)?))
                        }
                    }
                };
                p["file"] = json!(name);
                joined.push(repoint(line, &p).with_context(ctx)?);
            }
            ensure!(writer.rows() as usize == tokens, "the shards' sidecars hold {} rows but their summaries count {tokens} tokens", writer.rows());
            writer.write(&file)?;
            Some(sidecar_stats(&file, writer.rows(), k)?)
        }
        None => {
            joined.extend(lines.into_iter().map(|(_, l)| l));
            None
        }
    };
    let per_token = logits.as_ref().and_then(|l| l["bytes_per_token"].as_f64());
    let summary = crate::stages::transfer::summary_value(&mode, &teacher, joined.len(), tokens, logits);
    write_json_atomic(&summary_path(out), &summary)?;
    write_lines(out, &joined.iter().map(String::as_str).collect::<Vec<_>>())?;
    let mut line = format!("{} records, {tokens} tokens -> {}", joined.len(), out.display());
    if let Some(b) = per_token {
        line += &format!(" (+ logits at {b:.1} bytes per stored token)");
    }
    Ok(line)
}

fn id_in(line: &str) -> String {
    parse_strict(line).ok().and_then(|v| v.get("id").and_then(Value::as_str).map(str::to_string)).unwrap_or_else(|| "?".into())
}

fn filter(out: &Path, parts: &[Part]) -> Result<String> {
    let settings = &parts[0].manifest["settings"];
    let rules = Rules::from_json(&settings["rules"]).context("the shards' selection rules")?;
    // (line, token length, score bits) per record.
    let mut items = vec![];
    for p in parts {
        let lines = p.lines()?;
        let per = p.manifest["per_record"].as_array().with_context(|| format!("{}: the manifest has no `per_record`", p.path.display()))?;
        ensure!(per.len() == lines.len(), "{}: {} records but its manifest scores {}", p.path.display(), lines.len(), per.len());
        let mut mine = vec![];
        for (line, v) in lines.into_iter().zip(per) {
            let len = v[0].as_u64().context("a record without its length")? as usize;
            let bits: Vec<f64> = v[1].as_array().context("a record without its scores")?.iter().map(|b| b.as_u64().map(f64::from_bits)).collect::<Option<_>>().context("a score is not a bit pattern")?;
            ensure!(bits.len() == SCORE_NAMES.len(), "{}: a record has {} scores, expected {}", p.path.display(), bits.len(), SCORE_NAMES.len());
            mine.push((line, len, bits));
        }
        items.push(mine);
    }
    let items = in_order(parts, items)?;
    let n = items.len();
    let texts: Vec<String> = items
        .iter()
        .map(|(l, _, _)| match parse_strict(l) {
            Ok(Value::Object(r)) => full_text(&r as &Record),
            _ => bail!("a shard's record is not a JSON object: {l}"),
        })
        .collect::<Result<_>>()?;
    let lengths: Vec<usize> = items.iter().map(|i| i.1).collect();
    let value = |i: usize, k: &str| items[i].2[SCORE_NAMES.iter().position(|s| *s == k).expect("a known score")];
    let outcome = select(&rules, &lengths, &texts, value);
    let teacher = settings["teacher"].as_str().unwrap_or_default();
    let summary = crate::stages::filter::summary_json(&outcome, value, n, teacher, settings["student"].as_str());
    let sp = summary_path(out);
    write_json_atomic(&sp, &summary)?;
    let kept: Vec<&str> = items.iter().zip(&outcome.kept).filter(|(_, k)| **k).map(|(i, _)| i.0.as_str()).collect();
    ensure!(!kept.is_empty(), "every record was filtered out ({n} in); loosen the rules (summary in {})", sp.display());
    write_lines(out, &kept)?;
    Ok(format!("kept {} of {n} records -> {} (removed: {})", kept.len(), out.display(), serde_json::to_string(&summary["removed"])?))
}

fn eval(out: &Path, parts: &[Part]) -> Result<String> {
    let mut items = vec![];
    for p in parts {
        let per = &p.manifest["per_record"];
        let (ids, sums) = (per["ids"].as_array(), per["sums"].as_array());
        let (Some(ids), Some(sums)) = (ids, sums) else { bail!("{}: the manifest has no per-record sums", p.path.display()) };
        ensure!(ids.len() == sums.len(), "{}: {} ids but {} per-record sums", p.path.display(), ids.len(), sums.len());
        // Bytes and characters each record's targets spell, when the shard knew them.
        let covered: Option<Vec<(usize, usize)>> = serde_json::from_value(p.manifest["text_covered"].clone()).ok().flatten();
        ensure!(covered.as_ref().is_none_or(|c| c.len() == ids.len()), "{}: `text_covered` does not match the records", p.path.display());
        let mut mine = vec![];
        for (i, (id, s)) in ids.iter().zip(sums).enumerate() {
            let (_, r) = RecordSums::from_json(s).with_context(|| format!("{}: malformed per-record sums", p.path.display()))?;
            mine.push((id.as_str().unwrap_or_default().to_string(), r, covered.as_ref().map(|c| c[i])));
        }
        items.push(mine);
    }
    let items = in_order(parts, items)?;
    let with_teacher = !parts[0].manifest["settings"]["teacher"].is_null();
    let covered: Option<Vec<(usize, usize)>> = items.iter().map(|i| i.2).collect();
    let (ids, sums): (Vec<String>, Vec<RecordSums>) = items.into_iter().map(|(id, r, _)| (id, r)).unzip();
    let e = EvalMetrics::from_records(sums, with_teacher);
    let mut m: Map<String, Value> = parts[0].summary.as_object().cloned().context("a shard's metrics are not an object")?;
    m.remove("shard");
    let b = m["bootstrap"]["samples"].as_u64().context("a shard's metrics have no `bootstrap`")? as usize;
    let mut recs = crate::stages::eval::perplexity_entries(&mut m, &e, &ids, b)?;
    // Bits per byte when every shard knows the text its records' targets spell.
    if let Some(c) = covered.filter(|c| c.iter().any(|x| x.0 > 0)) {
        crate::stages::eval::bits_per_byte_entries(&mut m, &mut recs, &e, &c, b);
    }
    // Time and memory: the shards' total compute and the largest process.
    let total = |k: &str| parts.iter().map(|p| p.summary[k].as_f64().unwrap_or(0.0)).sum::<f64>();
    let secs = total("perplexity_seconds");
    m.insert("perplexity_seconds".into(), json!(secs));
    m.insert("perplexity_tokens_per_second".into(), json!((e.tokens + e.records as i64) as f64 / secs.max(1e-9)));
    m.insert("eval_seconds".into(), json!(total("eval_seconds")));
    if let Some(rss) = parts.iter().filter_map(|p| p.summary["peak_rss_bytes"].as_u64()).max() {
        m.insert("peak_rss_bytes".into(), json!(rss));
    }
    let items_path = crate::stages::eval::items_path(out);
    m.insert("items_file".into(), json!(items_path.file_name().map(|n| n.to_string_lossy().into_owned())));
    write_json_atomic(&items_path, &json!({"records": recs}))?;
    write_json_atomic(out, &Value::Object(m))?;
    Ok(format!("perplexity {:.4} over {} tokens ({} records) -> {}", e.perplexity, e.tokens, e.records, out.display()))
}

fn augment(out: &Path, parts: &[Part]) -> Result<String> {
    let (mut originals, mut made) = (vec![], vec![]);
    for p in parts {
        let lines = p.lines()?;
        let o = p.manifest["originals"].as_u64().context("the manifest has no `originals`")? as usize;
        let new = p.summary["new"].as_u64().context("the summary has no `new`")? as usize;
        ensure!(lines.len() == o + new, "{}: {} records, but its summary counts {o} originals and {new} new", p.path.display(), lines.len());
        let (a, b) = lines.split_at(o);
        originals.extend_from_slice(a);
        made.extend_from_slice(b);
    }
    let ops: Vec<String> = serde_json::from_value(parts[0].summary["ops"].clone()).context("the summary has no `ops`")?;
    let input = parts[0].manifest["input_records"].as_u64().unwrap_or(0) as usize;
    let ops_ref: Vec<&str> = ops.iter().map(String::as_str).collect();
    let summary = crate::stages::augment::summary_value(input, originals.len(), made.len(), &ops_ref);
    let n_new = made.len();
    originals.extend(made);
    write_json_atomic(&summary_path(out), &summary)?;
    write_lines(out, &originals.iter().map(String::as_str).collect::<Vec<_>>())?;
    Ok(format!("{n_new} new records from {input} ({}) -> {}", ops.join(","), out.display()))
}
