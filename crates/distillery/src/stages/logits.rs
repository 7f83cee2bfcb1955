//! kd-logits: tools for offline-logits sidecars. `convert` rewrites a JSONL's sidecar in the
//! other format (kd-generate's records, their pointers renumbered to the new file, the rest of
//! each line byte for byte); `read` reads every record's rows through the reader training uses.
//! Both report their throughput (docs/BENCHMARKS.md).
use crate::data::records::write_lines;
use crate::data::teacher_logits::{sidecar_path_for, LogitsFormat, LogitsReader, LogitsWriter, TopRows};
use crate::stages::merge::repoint;
use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use std::path::Path;
use std::time::Instant;
use tch::Kind;

fn pointers(data: &Path) -> Result<Vec<(String, Option<Value>)>> {
    let text = std::fs::read_to_string(data).with_context(|| format!("reading {}", data.display()))?;
    let mut out = vec![];
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: Value = crate::data::records::parse_strict(line).with_context(|| format!("{}:{}: malformed JSON", data.display(), n + 1))?;
        out.push((line.to_string(), v.get("teacher_logits").cloned()));
    }
    ensure!(out.iter().any(|(_, p)| p.is_some()), "{}: no record has a `teacher_logits` pointer", data.display());
    Ok(out)
}

fn reader_for(data: &Path) -> LogitsReader {
    LogitsReader::new(data.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")))
}

/// Rewrites `data`'s records and sidecar as `out` with a sidecar in `format`.
pub fn convert(data: &Path, out: &Path, format: LogitsFormat) -> Result<String> {
    let recs = pointers(data)?;
    let mut reader = reader_for(data);
    let file = sidecar_path_for(out, format);
    let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let k = recs.iter().find_map(|(_, p)| p.as_ref()?.get("k")?.as_i64()).context("no pointer names its `k`")?;
    let mut writer = LogitsWriter::with_format(k, format);
    let mut lines = vec![];
    for (i, (line, p)) in recs.iter().enumerate() {
        let Some(p) = p else {
            lines.push(line.clone());
            continue;
        };
        let (idx, lp, tail) = reader.rows(p).with_context(|| format!("{}: record {}", data.display(), i + 1))?;
        let rows = TopRows { indices: idx.to_kind(Kind::Int), logprobs: lp.to_kind(Kind::Half), tail_logmass: tail.to_kind(Kind::Half) };
        let mut np = writer.push_rows(rows);
        np["file"] = json!(name);
        lines.push(repoint(line, &np).with_context(|| format!("{}: record {}", data.display(), i + 1))?);
    }
    let t = Instant::now();
    writer.write(&file)?;
    let secs = t.elapsed().as_secs_f64();
    write_lines(out, &lines.iter().map(String::as_str).collect::<Vec<_>>())?;
    let bytes = std::fs::metadata(&file)?.len();
    let rows = writer.rows();
    Ok(format!(
        "{rows} rows of top-{k} -> {} ({}: {:.1} bytes per stored token); written in {secs:.3}s: {:.0} rows/s, {:.1} MB/s",
        file.display(),
        format.name(),
        bytes as f64 / rows.max(1) as f64,
        rows as f64 / secs.max(1e-9),
        bytes as f64 / 1e6 / secs.max(1e-9)
    ))
}

/// Reads every record's rows of `data` (from `sidecar` when given, else each pointer's file).
pub fn read(data: &Path, sidecar: Option<&Path>) -> Result<String> {
    let recs = pointers(data)?;
    let mut reader = match sidecar {
        Some(s) => LogitsReader::with_file(s),
        None => reader_for(data),
    };
    let t = Instant::now();
    let mut rows = 0;
    for (i, (_, p)) in recs.iter().enumerate() {
        if let Some(p) = p {
            let (idx, _, _) = reader.rows(p).with_context(|| format!("{}: record {}", data.display(), i + 1))?;
            rows += idx.size()[0];
        }
    }
    let secs = t.elapsed().as_secs_f64();
    Ok(format!("read {rows} rows of {} records in {secs:.3}s: {:.0} rows/s", recs.len(), rows as f64 / secs.max(1e-9)))
}
