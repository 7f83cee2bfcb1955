//! The reproducibility card at the end of every report: the git commit, the versions, each
//! stage's exact command line (from the command log), the seeds, and a SHA-256 of every
//! input file and model, so that someone else can rerun the table.
use super::Row;
use crate::base::provenance::{read_command_log, CommandRecord, DISTILLERY_VERSION, LIBTORCH_VERSION, TCH_VERSION};
use crate::base::stats::BOOTSTRAP_SEED;
use anyhow::{Context, Result};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

pub(crate) struct Card {
    commit: String,
    environment: Option<Value>,
    commands: Vec<CommandRecord>,
    seeds: Vec<(String, String)>,
    /// (path as given, bytes, sha256)
    hashes: Vec<(String, u64, String)>,
    bootstrap_samples: usize,
}

/// SHA-256 of a file, streamed.
fn sha256_file(path: &Path) -> Result<(u64, String)> {
    let mut f = std::fs::File::open(path).with_context(|| format!("hashing {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
        h.update(&buf[..n]);
    }
    Ok((total, format!("{:x}", h.finalize())))
}

/// The files that make a model: weights, index, config, tokenizer (not training state).
fn model_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    v.retain(|p| {
        let n = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        p.is_file() && (n.ends_with(".safetensors") || n.ends_with(".json") && !n.starts_with('.'))
    });
    v.sort();
    v
}

fn git_commit() -> String {
    let run = |args: &[&str]| std::process::Command::new("git").args(args).output().ok().filter(|o| o.status.success());
    match run(&["rev-parse", "HEAD"]) {
        Some(o) => {
            let head = String::from_utf8_lossy(&o.stdout).trim().to_string();
            let dirty = run(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|o| !o.stdout.is_empty());
            if dirty { format!("{head} (with uncommitted changes to tracked files)") } else { head }
        }
        None => "unknown (not run inside a git checkout)".into(),
    }
}

impl Card {
    pub fn collect(rows: &[Row], metrics: &[PathBuf], commands: Option<&Path>, environment: Option<&Path>, bootstrap_samples: usize) -> Result<Card> {
        let commands: Vec<CommandRecord> = match commands {
            Some(p) => read_command_log(p)?,
            None => vec![],
        };
        // The last successful run of each distinct command line, in the order they ran.
        let mut seen = BTreeMap::new();
        for (i, c) in commands.iter().enumerate().filter(|(_, c)| c.ok) {
            seen.insert(c.argv.clone(), i);
        }
        let mut order: Vec<usize> = seen.into_values().collect();
        order.sort();
        let commands: Vec<CommandRecord> = order.into_iter().map(|i| commands[i].clone()).collect();
        let environment = match environment {
            Some(p) => Some(serde_json::from_str(&std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)?),
            None => None,
        };
        let seeds = rows.iter().filter_map(|r| Some((r.name.clone(), r.seed()?.to_string()))).collect();

        // Every input: the models and data each evaluation names, and every existing file or
        // model folder on a logged command line (relative to where it ran).
        let mut inputs: Vec<(String, PathBuf)> = vec![];
        for (r, p) in rows.iter().zip(metrics) {
            inputs.push((p.display().to_string(), p.clone()));
            for k in ["model", "teacher", "data", "mc", "cloze", "generate"] {
                if let Some(s) = r.s(k) {
                    inputs.push((s.to_string(), PathBuf::from(s)));
                }
            }
        }
        for c in &commands {
            for a in c.argv.iter().skip(1).filter(|a| !a.starts_with('-')) {
                let p = Path::new(&c.cwd).join(a);
                if p.is_file() || p.join("config.json").is_file() {
                    inputs.push((a.clone(), p));
                }
            }
        }
        let mut hashes = vec![];
        let mut done = std::collections::BTreeSet::new();
        for (shown, p) in inputs {
            let Ok(canon) = p.canonicalize() else { continue };
            if !done.insert(canon.clone()) {
                continue;
            }
            if canon.is_dir() {
                for f in model_files(&canon) {
                    let (n, h) = sha256_file(&f)?;
                    hashes.push((format!("{}/{}", shown.trim_end_matches('/'), f.file_name().unwrap().to_string_lossy()), n, h));
                }
            } else if canon.is_file() {
                let (n, h) = sha256_file(&canon)?;
                hashes.push((shown, n, h));
            }
        }
        Ok(Card { commit: git_commit(), environment, commands, seeds, hashes, bootstrap_samples })
    }

    pub fn markdown(&self) -> String {
        let mut md = "\n## Reproducibility card\n\n".to_string();
        md += &format!("* git commit: `{}`\n", self.commit);
        md += &format!("* distillery {DISTILLERY_VERSION}, tch {TCH_VERSION}, libtorch {LIBTORCH_VERSION} (compiled into these binaries)\n");
        match &self.environment {
            Some(e) => {
                let g = |k: &str| e.get(k).map_or("?".to_string(), |v| v.as_str().map(String::from).unwrap_or_else(|| v.to_string()));
                md += &format!(
                    "* torch {}, transformers {}, Python {}; {} ({} CPUs), {}\n",
                    g("torch"), g("transformers"), g("python"), g("cpu"), g("cpu_count"), g("platform")
                );
            }
            None => md += "* Python environment: not recorded (give `--environment`, written by scripts/environment.py)\n",
        }
        md += &format!(
            "* statistics: Wilson 95% intervals for accuracies; percentile bootstrap, {} resamples, seed {BOOTSTRAP_SEED}, over \
             held-out records (perplexity, KL, agreement, and paired differences of perplexity and KL) or items (ROUGE-L); McNemar's exact test for paired accuracies\n",
            self.bootstrap_samples
        );
        if !self.seeds.is_empty() {
            md += "* training seeds: ";
            md += &self.seeds.iter().map(|(n, s)| format!("{n} {s}")).collect::<Vec<_>>().join(", ");
            md += "\n";
        }
        if self.commands.is_empty() {
            md += "\nNo command log was given (`--commands`, the file `KD_COMMAND_LOG` names while the stages run).\n";
        } else {
            md += &format!("\n### Commands, in the order they ran ({} distinct, last successful run of each)\n\n```sh\n", self.commands.len());
            let mut cwd = String::new();
            for c in &self.commands {
                if c.cwd != cwd {
                    md += &format!("cd {}\n", quote(&c.cwd));
                    cwd = c.cwd.clone();
                }
                md += &format!("{}   # {:.0} s\n", c.argv.iter().map(|a| quote(a)).collect::<Vec<_>>().join(" "), c.seconds);
            }
            md += "```\n";
        }
        md += &format!("\n### Inputs, models and results (SHA-256)\n\n| file | bytes | sha256 |\n|---|---:|---|\n");
        for (p, n, h) in &self.hashes {
            md += &format!("| {p} | {n} | `{h}` |\n");
        }
        md
    }
}

/// A shell word: quoted when it holds anything but safe characters.
fn quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}
