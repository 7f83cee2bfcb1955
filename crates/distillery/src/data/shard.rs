//! Sharding a stage over processes or hosts: `--shard I/N` (I counted from 0). A stage
//! that runs a model in batches cuts its work into the batches an unsharded run makes (its
//! own order, `--batch-size` items each) and shard I takes the I-th contiguous block of N
//! of those batches ([`Shard::batch_block`]): on the CPU a sequence's floating-point results
//! depend on the batch it is padded in, so this is what makes the joined shards equal an
//! unsharded run byte for byte. kd-augment, whose model work is generation (independent of
//! batching), takes the I-th contiguous block of N of the records ([`Shard::range`]). Every
//! record keeps its position in the whole file for its seeded streams, so a shard samples
//! exactly what an unsharded run samples for the same records.
//!
//! Each shard's summary carries a manifest ([`Shard::manifest`]): the stage, `I` and `N`,
//! the input file's fingerprint, the settings that change the output and, per output line,
//! its position in the unsharded output. kd-merge refuses shards whose manifests disagree
//! and puts the lines back in unsharded order.
use crate::base::io::file_fingerprint;
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// `<out>.summary.json` beside a JSONL output: where kd-generate, kd-filter and kd-augment
/// write their summaries and where kd-merge looks for them.
pub fn summary_path(out: &Path) -> PathBuf {
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    out.with_file_name(format!("{name}.summary.json"))
}

/// `--shard I/N`; [`Shard::WHOLE`] is a run without the flag. `--shard 0/1` covers the same
/// records but is a shard: it writes a manifest and kd-merge takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
    /// Whether `--shard` was given.
    pub given: bool,
}

impl FromStr for Shard {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Shard> {
        let (i, n) = s.split_once('/').with_context(|| format!("--shard `{s}`: expected I/N, e.g. 0/4"))?;
        let index: usize = i.trim().parse().with_context(|| format!("--shard `{s}`: `{i}` is not a shard index"))?;
        let count: usize = n.trim().parse().with_context(|| format!("--shard `{s}`: `{n}` is not a shard count"))?;
        ensure!(count >= 1, "--shard `{s}`: the shard count must be at least 1");
        ensure!(index < count, "--shard `{s}`: shards are counted from 0, so the index must be below {count}");
        Ok(Shard { index, count, given: true })
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl Shard {
    /// The whole input: what a run without `--shard` takes.
    pub const WHOLE: Shard = Shard { index: 0, count: 1, given: false };

    /// This shard's block of `n` units (`what`: records or batches). Refuses more shards than
    /// units, so that no shard is empty.
    pub fn block(&self, n: usize, what: &str) -> Result<Range<usize>> {
        if self.count > n {
            bail!("--shard {self}: the run has only {n} {what}; use at most {n} shards");
        }
        Ok(n * self.index / self.count..n * (self.index + 1) / self.count)
    }

    /// This shard's block of `n` records.
    pub fn range(&self, n: usize) -> Result<Range<usize>> {
        self.block(n, "records")
    }

    /// The items (indices into `order`) of this shard's block of the batches that an
    /// unsharded run makes by cutting `order` into `batch_size` pieces: each item is then
    /// computed in exactly the batch, with exactly the padding, it has in the unsharded run.
    pub fn batch_block(&self, n_items: usize, batch_size: usize) -> Result<Range<usize>> {
        let batches = n_items.div_ceil(batch_size.max(1));
        let b = self.block(batches, "batches of --batch-size (a smaller --batch-size makes more)")?;
        Ok(b.start * batch_size..(b.end * batch_size).min(n_items))
    }

    /// The manifest a shard's summary carries under `shard`.
    pub fn manifest(&self, stage: &str, input: &Path, settings: Value, n_input: usize) -> Result<Value> {
        Ok(json!({
            "stage": stage,
            "index": self.index,
            "count": self.count,
            "input": input.display().to_string(),
            "input_fingerprint": file_fingerprint(input)?,
            "input_records": n_input,
            "settings": settings,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_cover_the_input_once() {
        for n in 1..12 {
            for count in 1..=n {
                let mut next = 0;
                for index in 0..count {
                    let r = Shard { index, count, given: true }.range(n).unwrap();
                    assert_eq!(r.start, next);
                    assert!(!r.is_empty());
                    next = r.end;
                }
                assert_eq!(next, n);
            }
        }
    }

    #[test]
    fn parses_and_refuses() {
        assert_eq!("2/3".parse::<Shard>().unwrap(), Shard { index: 2, count: 3, given: true });
        assert!("3/3".parse::<Shard>().unwrap_err().to_string().contains("counted from 0"));
        assert!("1/0".parse::<Shard>().is_err());
        assert!("1".parse::<Shard>().is_err());
        assert!(Shard { index: 0, count: 5, given: true }.range(4).unwrap_err().to_string().contains("only 4 records"));
        assert_eq!(Shard { index: 1, count: 2, given: true }.batch_block(7, 2).unwrap(), 4..7);
        assert_eq!(Shard { index: 0, count: 2, given: true }.batch_block(7, 2).unwrap(), 0..4);
        assert!(Shard { index: 0, count: 3, given: true }.batch_block(4, 2).is_err());
    }
}
