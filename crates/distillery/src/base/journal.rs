//! Resumable ordered output for the long stages (kd-generate, kd-filter, kd-eval,
//! kd-augment). Finished work items are appended to `<out>.journal/` in parts: each part is
//! a JSONL file of one line per item (plus an optional binary file, e.g. stored logits),
//! written under a temporary name, fsynced, renamed, and then listed in `journal.json`, whose
//! atomic replacement is the commit. After a kill, `--resume` reads the committed parts back
//! (checking sizes and checksums), and the stage skips those items; the final output is
//! assembled from them and written atomically, and the journal removed. Outputs still appear
//! only when complete.
//!
//! A stage processes its items in a fixed order and in fixed batches, and commits only
//! between batches, so a resumed run meets exactly the batches an uninterrupted one would:
//! its output is byte-identical. The journal's `fingerprint` (settings and input checksums)
//! must match for `--resume` to use it.
use crate::base::io::{fnv64, sync_dir, write_json_atomic, write_via_temp};
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A part is committed once it holds this many items (`DISTILLERY_JOURNAL_ITEMS` changes
/// it: smaller parts lose less to a kill and cost more fsyncs) ...
const COMMIT_ITEMS: usize = 64;
/// ... or this long after the previous commit, whichever comes first.
const COMMIT_EVERY: Duration = Duration::from_secs(30);

fn commit_items() -> usize {
    std::env::var("DISTILLERY_JOURNAL_ITEMS").ok().and_then(|v| v.parse().ok()).filter(|&n| n > 0).unwrap_or(COMMIT_ITEMS)
}

/// The journal directory of an output file.
pub fn journal_dir(out: &Path) -> PathBuf {
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    out.with_file_name(format!("{name}.journal"))
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct FileEntry {
    file: String,
    bytes: u64,
    fnv64: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct PartEntry {
    items: usize,
    lines: FileEntry,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    extra: Option<FileEntry>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Manifest {
    version: u32,
    fingerprint: Value,
    parts: Vec<PartEntry>,
}

pub struct Journal {
    dir: PathBuf,
    manifest: Manifest,
    restored: Vec<String>,
    pending: Vec<String>,
    last_commit: Instant,
}

fn entry(dir: &Path, file: String) -> Result<FileEntry> {
    let bytes = std::fs::read(dir.join(&file))?;
    Ok(FileEntry { file, bytes: bytes.len() as u64, fnv64: format!("{:016x}", fnv64(&bytes)) })
}

impl Journal {
    /// Opens the journal of `out` for the work `fingerprint` describes. With `resume`, a
    /// journal left by an interrupted run of the same work is read back; without it, an
    /// existing journal is an error (it holds finished work that would be thrown away).
    pub fn open(out: &Path, fingerprint: Value, resume: bool) -> Result<Journal> {
        let dir = journal_dir(out);
        let manifest_path = dir.join("journal.json");
        let fresh = Manifest { version: 1, fingerprint: fingerprint.clone(), parts: vec![] };
        let mut journal = Journal { dir: dir.clone(), manifest: fresh, restored: vec![], pending: vec![], last_commit: Instant::now() };
        if !dir.exists() {
            return Ok(journal);
        }
        if !manifest_path.is_file() {
            // A run killed before its first commit: nothing finished to keep.
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing the empty journal {}", dir.display()))?;
            return Ok(journal);
        }
        let text = std::fs::read_to_string(&manifest_path).with_context(|| format!("reading {}", manifest_path.display()))?;
        let manifest: Manifest = serde_json::from_str(&text).with_context(|| format!("{}: not a journal manifest", manifest_path.display()))?;
        let done: usize = manifest.parts.iter().map(|p| p.items).sum();
        if !resume {
            bail!(
                "{} holds the journal of an interrupted run ({done} items finished); add --resume to continue it, \
                 or remove it to start over",
                dir.display()
            );
        }
        if manifest.fingerprint != fingerprint {
            let differing = differences(&manifest.fingerprint, &fingerprint);
            bail!(
                "{}: the journal was written for other inputs or settings ({}); remove it to start over",
                dir.display(),
                differing.join("; ")
            );
        }
        for (i, part) in manifest.parts.iter().enumerate() {
            for f in std::iter::once(&part.lines).chain(part.extra.as_ref()) {
                let found = entry(&dir, f.file.clone()).with_context(|| format!("{}: part {i} is missing {}", dir.display(), f.file))?;
                ensure!(found == *f, "{}: {} is damaged (size or checksum differs from journal.json); remove the journal to start over", dir.display(), f.file);
            }
            let text = std::fs::read_to_string(dir.join(&part.lines.file))?;
            let lines: Vec<String> = text.lines().map(String::from).collect();
            ensure!(lines.len() == part.items, "{}: {} has {} lines, journal.json says {}", dir.display(), part.lines.file, lines.len(), part.items);
            journal.restored.extend(lines);
        }
        journal.manifest = manifest;
        eprintln!("resuming from {}: {} items already done", dir.display(), journal.restored.len());
        Ok(journal)
    }

    /// Items finished by earlier runs, in processing order.
    pub fn restored(&self) -> &[String] {
        &self.restored
    }

    /// Items done, committed or pending.
    pub fn done(&self) -> usize {
        self.manifest.parts.iter().map(|p| p.items).sum::<usize>() + self.pending.len()
    }

    /// The restored items of each committed part and its extra file.
    pub fn restored_parts(&self) -> Vec<(Range<usize>, Option<PathBuf>)> {
        let mut start = 0;
        let mut out = vec![];
        for p in &self.manifest.parts {
            if start >= self.restored.len() {
                break;
            }
            out.push((start..start + p.items, p.extra.as_ref().map(|e| self.dir.join(&e.file))));
            start += p.items;
        }
        out
    }

    /// Adds a finished item (one line, no newline) to the current part.
    pub fn push(&mut self, line: String) {
        debug_assert!(!line.contains('\n'));
        self.pending.push(line);
    }

    /// Whether the current part is big or old enough to commit (call between batches).
    pub fn due(&self) -> bool {
        self.pending.len() >= commit_items() || (!self.pending.is_empty() && self.last_commit.elapsed() >= COMMIT_EVERY)
    }

    /// Commits the pending items as a part; `extra` writes the part's binary file (called
    /// with the temporary path to write).
    pub fn commit(&mut self, extra: Option<&dyn Fn(&Path) -> Result<()>>) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        std::fs::create_dir_all(&self.dir).with_context(|| format!("creating {}", self.dir.display()))?;
        let n = self.manifest.parts.len();
        let extra_entry = match extra {
            Some(write) => {
                let name = format!("part-{n:06}.bin");
                write_via_temp(&self.dir.join(&name), |tmp| {
                    write(tmp)?;
                    std::fs::File::open(tmp)?.sync_all()?;
                    Ok(())
                })?;
                Some(entry(&self.dir, name)?)
            }
            None => None,
        };
        let name = format!("part-{n:06}.jsonl");
        let mut text = self.pending.join("\n");
        text.push('\n');
        write_via_temp(&self.dir.join(&name), |tmp| {
            let mut f = std::fs::File::create(tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            Ok(())
        })?;
        let lines = FileEntry { file: name, bytes: text.len() as u64, fnv64: format!("{:016x}", fnv64(text.as_bytes())) };
        self.manifest.parts.push(PartEntry { items: self.pending.len(), lines, extra: extra_entry });
        // The commit: the manifest that lists the part replaces the old one in one rename.
        if let Err(e) = write_json_atomic(&self.dir.join("journal.json"), &self.manifest).and_then(|()| sync_dir(&self.dir)) {
            self.manifest.parts.pop();
            return Err(e.context(format!("committing a part of {}", self.dir.display())));
        }
        self.pending.clear();
        self.last_commit = Instant::now();
        Ok(())
    }

    /// The work is complete and its output written: the journal goes.
    pub fn finish(self) -> Result<()> {
        if self.dir.exists() {
            std::fs::remove_dir_all(&self.dir).with_context(|| format!("removing {}", self.dir.display()))?;
        }
        Ok(())
    }
}

fn differences(old: &Value, new: &Value) -> Vec<String> {
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter()
                .filter(|k| a.get(*k) != b.get(*k))
                .map(|k| format!("{k}: {} -> {}", a.get(k).unwrap_or(&Value::Null), b.get(k).unwrap_or(&Value::Null)))
                .collect()
        }
        _ => vec![format!("{old} -> {new}")],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("distillery-journal-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d.join("out.jsonl")
    }

    #[test]
    fn committed_parts_come_back_and_pending_ones_do_not() {
        let out = tmp("roundtrip");
        let fp = json!({"seed": 1});
        let mut j = Journal::open(&out, fp.clone(), false).unwrap();
        for i in 0..3 {
            j.push(format!("{{\"i\":{i}}}"));
        }
        j.commit(Some(&|p: &Path| Ok(std::fs::write(p, b"abc")?))).unwrap();
        j.push("{\"i\":3}".into());
        assert_eq!(j.done(), 4);
        drop(j); // killed: the pending item is lost
        let err = Journal::open(&out, fp.clone(), false).err().unwrap().to_string();
        assert!(err.contains("add --resume"), "{err}");
        let err = Journal::open(&out, json!({"seed": 2}), true).err().unwrap().to_string();
        assert!(err.contains("seed: 1 -> 2"), "{err}");
        let j = Journal::open(&out, fp.clone(), true).unwrap();
        assert_eq!(j.restored(), &["{\"i\":0}", "{\"i\":1}", "{\"i\":2}"]);
        let parts = j.restored_parts();
        assert_eq!(parts.len(), 1);
        assert_eq!(std::fs::read(parts[0].1.as_ref().unwrap()).unwrap(), b"abc");
        // A damaged part is refused rather than silently used.
        std::fs::write(journal_dir(&out).join("part-000000.jsonl"), "{\"i\":9}\n{\"i\":1}\n{\"i\":2}\n").unwrap();
        let err = Journal::open(&out, fp, true).err().unwrap().to_string();
        assert!(err.contains("damaged"), "{err}");
        j.finish().unwrap();
        assert!(!journal_dir(&out).exists());
    }
}
