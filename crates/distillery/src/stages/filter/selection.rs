//! Transfer-set selection, kd-filter's rules: length limits, exact and near duplicates,
//! thresholds on scores, and top/bottom fractions by a score whose union is kept. Every
//! dropped record is counted under the first rule that dropped it.
use crate::stages::filter::scoring::{near_duplicates, RecordScores};
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashSet};

/// Scores a rule can name (CONTRACT.md's `scores` keys, plus `tokens`).
pub const SCORE_NAMES: &[&str] =
    &["teacher_logprob", "teacher_confidence", "teacher_entropy", "kl_teacher_student", "ce_gap", "tokens"];

/// A record's score by name; NaN where it was not computed (student scores without a student).
pub fn score_value(s: &RecordScores, name: &str) -> f64 {
    match name {
        "teacher_logprob" => s.teacher_logprob,
        "teacher_confidence" => s.teacher_confidence,
        "teacher_entropy" => s.teacher_entropy,
        "kl_teacher_student" => s.kl_teacher_student.unwrap_or(f64::NAN),
        "ce_gap" => s.ce_gap.unwrap_or(f64::NAN),
        "tokens" => s.tokens as f64,
        other => unreachable!("unknown score `{other}` passed validation"),
    }
}

fn known_score(name: &str) -> Result<()> {
    ensure!(SCORE_NAMES.contains(&name), "unknown score `{name}` (scores: {})", SCORE_NAMES.join(", "));
    Ok(())
}

/// `SCORE=VALUE`: keep records whose score is at least (`--min`) or at most (`--max`) VALUE.
#[derive(Clone, Debug, PartialEq)]
pub struct Bound {
    pub score: String,
    pub value: f64,
    pub at_least: bool,
}

impl Bound {
    pub fn parse(spec: &str, at_least: bool) -> Result<Bound> {
        let (k, v) = spec.split_once('=').with_context(|| format!("`{spec}`: expected SCORE=VALUE"))?;
        known_score(k)?;
        let value = v.parse().with_context(|| format!("`{spec}`: value is not a number"))?;
        Ok(Bound { score: k.to_string(), value, at_least })
    }

    /// NaN (a score that could not be computed) never passes.
    fn passes(&self, v: f64) -> bool {
        if self.at_least { v >= self.value } else { v <= self.value }
    }

    fn label(&self) -> String {
        format!("{} {}={}", if self.at_least { "min" } else { "max" }, self.score, self.value)
    }
}

/// `SCORE:top|bottom:FRACTION`: keep that fraction of the surviving records, highest or lowest first.
#[derive(Clone, Debug, PartialEq)]
pub struct Fraction {
    pub score: String,
    pub top: bool,
    pub fraction: f64,
}

impl Fraction {
    pub fn parse(spec: &str) -> Result<Fraction> {
        let parts: Vec<&str> = spec.split(':').collect();
        ensure!(parts.len() == 3, "--select `{spec}`: expected SCORE:top|bottom:FRACTION");
        known_score(parts[0])?;
        let top = match parts[1] {
            "top" => true,
            "bottom" => false,
            o => bail!("--select `{spec}`: `{o}` must be top or bottom"),
        };
        let fraction: f64 = parts[2].parse().with_context(|| format!("--select `{spec}`: bad fraction"))?;
        ensure!((0.0..=1.0).contains(&fraction), "--select `{spec}`: fraction must be in [0, 1]");
        Ok(Fraction { score: parts[0].into(), top, fraction })
    }

    fn label(&self) -> String {
        format!("{}:{}:{}", self.score, if self.top { "top" } else { "bottom" }, self.fraction)
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Dedup {
    None,
    /// Same text after whitespace normalisation.
    Exact,
    /// Exact, then MinHash on word 3-grams at this estimated Jaccard similarity.
    Near(f64),
}

impl Dedup {
    pub fn parse(name: &str, near_threshold: f64) -> Result<Dedup> {
        Ok(match name {
            "none" => Dedup::None,
            "exact" => Dedup::Exact,
            "near" => Dedup::Near(near_threshold),
            o => bail!("--dedup `{o}`: must be none, exact or near"),
        })
    }
}

#[derive(Clone, Debug)]
pub struct Rules {
    pub min_tokens: Option<usize>,
    pub max_tokens: Option<usize>,
    pub dedup: Dedup,
    pub bounds: Vec<Bound>,
    pub fractions: Vec<Fraction>,
}

impl Rules {
    /// The rules as their command-line specs (a sharded run's manifest carries them, and
    /// kd-merge applies them to the joined shards).
    pub fn to_json(&self) -> Value {
        let dedup = match self.dedup {
            Dedup::None => json!("none"),
            Dedup::Exact => json!("exact"),
            Dedup::Near(t) => json!(format!("near:{t}")),
        };
        json!({
            "min_tokens": self.min_tokens,
            "max_tokens": self.max_tokens,
            "dedup": dedup,
            "bounds": self.bounds.iter().map(|b| json!([b.at_least, format!("{}={}", b.score, b.value)])).collect::<Vec<_>>(),
            "fractions": self.fractions.iter().map(Fraction::label).collect::<Vec<_>>(),
        })
    }

    /// Reads back [`Rules::to_json`].
    pub fn from_json(v: &Value) -> Result<Rules> {
        let size = |k: &str| v[k].as_u64().map(|n| n as usize);
        let dedup = match v["dedup"].as_str().context("rules without `dedup`")? {
            d if d.starts_with("near:") => Dedup::Near(d[5..].parse().context("bad near-duplicate threshold")?),
            d => Dedup::parse(d, 0.0)?,
        };
        let mut bounds = vec![];
        for b in v["bounds"].as_array().context("rules without `bounds`")? {
            let at_least = b[0].as_bool().context("a bound without its direction")?;
            bounds.push(Bound::parse(b[1].as_str().context("a bound without its spec")?, at_least)?);
        }
        let fractions = v["fractions"].as_array().context("rules without `fractions`")?;
        let fractions = fractions.iter().map(|f| Fraction::parse(f.as_str().unwrap_or_default())).collect::<Result<_>>()?;
        Ok(Rules { min_tokens: size("min_tokens"), max_tokens: size("max_tokens"), dedup, bounds, fractions })
    }

    /// Whether a rule reads a score that only exists with a student model.
    pub fn needs_student(&self) -> bool {
        let student_score = |k: &str| k == "kl_teacher_student" || k == "ce_gap";
        self.bounds.iter().any(|b| student_score(&b.score)) || self.fractions.iter().any(|f| student_score(&f.score))
    }
}

#[derive(Debug, Default)]
pub struct Outcome {
    /// One flag per record.
    pub kept: Vec<bool>,
    /// Records dropped, by the rule that dropped them.
    pub removed: BTreeMap<String, usize>,
    /// Records each `--select` rule chose (their union is kept).
    pub selected_by: BTreeMap<String, usize>,
}

impl Outcome {
    fn drop(&mut self, i: usize, why: &str) {
        if self.kept[i] {
            self.kept[i] = false;
            *self.removed.entry(why.to_string()).or_default() += 1;
        }
    }
}

/// Applies the rules in order: length, duplicates (the first of equal texts stays), bounds,
/// then fractions of what survived. `lengths` are token counts, `texts` the full texts and
/// `score(i, name)` record i's score.
pub fn select(rules: &Rules, lengths: &[usize], texts: &[String], score: impl Fn(usize, &str) -> f64) -> Outcome {
    let n = lengths.len();
    assert_eq!(texts.len(), n, "one text per record");
    let mut out = Outcome { kept: vec![true; n], ..Default::default() };
    for (i, &len) in lengths.iter().enumerate() {
        if rules.min_tokens.is_some_and(|m| len < m) || rules.max_tokens.is_some_and(|m| len > m) {
            out.drop(i, "length");
        }
    }
    if rules.dedup != Dedup::None {
        let mut seen = HashSet::new();
        for (i, text) in texts.iter().enumerate() {
            let norm = text.split_whitespace().collect::<Vec<_>>().join(" ");
            if out.kept[i] && !seen.insert(norm) {
                out.drop(i, "exact_duplicate");
            }
        }
    }
    if let Dedup::Near(threshold) = rules.dedup {
        let idx: Vec<usize> = (0..n).filter(|&i| out.kept[i]).collect();
        let subset: Vec<String> = idx.iter().map(|&i| texts[i].clone()).collect();
        for j in near_duplicates(&subset, threshold) {
            out.drop(idx[j], "near_duplicate");
        }
    }
    for i in 0..n {
        for b in &rules.bounds {
            if out.kept[i] && !b.passes(score(i, &b.score)) {
                out.drop(i, &b.label());
            }
        }
    }
    if !rules.fractions.is_empty() {
        let pool: Vec<usize> = (0..n).filter(|&i| out.kept[i]).collect();
        let mut keep = HashSet::new();
        for f in &rules.fractions {
            let mut order = pool.clone();
            // Ties (and NaN, which sorts last either way) keep input order.
            order.sort_by(|&a, &b| {
                let (va, vb) = (score(a, &f.score), score(b, &f.score));
                let c = if f.top { vb.total_cmp(&va) } else { va.total_cmp(&vb) };
                let nan_last = va.is_nan().cmp(&vb.is_nan());
                nan_last.then(c).then(a.cmp(&b))
            });
            let take = (f.fraction * pool.len() as f64).round() as usize;
            keep.extend(order.iter().take(take).copied());
            out.selected_by.insert(f.label(), take);
        }
        for i in pool {
            if !keep.contains(&i) {
                out.drop(i, "not selected");
            }
        }
    }
    out
}

/// Ten equal-width bins between the smallest and largest value (the summary's histograms).
pub fn histogram(values: &[f64]) -> Value {
    if values.is_empty() {
        return json!(null);
    }
    let (lo, hi) = values.iter().fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let mut counts = [0usize; 10];
    for &v in values {
        let k = if hi > lo { (((v - lo) / (hi - lo)) * 10.0) as usize } else { 0 };
        counts[k.min(9)] += 1;
    }
    json!({"min": lo, "max": hi, "bins": 10, "counts": counts})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules { min_tokens: None, max_tokens: None, dedup: Dedup::None, bounds: vec![], fractions: vec![] }
    }

    fn texts(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("record {i}")).collect()
    }

    #[test]
    fn rules_survive_a_shard_manifest() {
        let rules = Rules {
            min_tokens: Some(3),
            max_tokens: None,
            dedup: Dedup::Near(0.75),
            bounds: vec![Bound::parse("teacher_entropy=2.5", false).unwrap(), Bound::parse("tokens=4", true).unwrap()],
            fractions: vec![Fraction::parse("teacher_confidence:top:0.7").unwrap()],
        };
        let back = Rules::from_json(&rules.to_json()).unwrap();
        assert_eq!((back.min_tokens, back.max_tokens, back.dedup), (Some(3), None, Dedup::Near(0.75)));
        assert_eq!(back.bounds, rules.bounds);
        assert_eq!(back.fractions, rules.fractions);
    }

    #[test]
    fn parses_rules_and_names_bad_ones() {
        assert_eq!(
            Bound::parse("teacher_confidence=0.4", true).unwrap(),
            Bound { score: "teacher_confidence".into(), value: 0.4, at_least: true }
        );
        assert_eq!(Fraction::parse("ce_gap:bottom:0.25").unwrap(), Fraction { score: "ce_gap".into(), top: false, fraction: 0.25 });
        assert!(Bound::parse("confidence=1", true).unwrap_err().to_string().contains("unknown score `confidence`"));
        assert!(Bound::parse("tokens", true).unwrap_err().to_string().contains("SCORE=VALUE"));
        assert!(Fraction::parse("tokens:up:0.5").unwrap_err().to_string().contains("top or bottom"));
        assert!(Fraction::parse("tokens:top:1.5").unwrap_err().to_string().contains("[0, 1]"));
        assert!(Dedup::parse("fuzzy", 0.8).is_err());
    }

    #[test]
    fn fractions_keep_the_union_and_break_ties_by_input_order() {
        let conf = [0.9, 0.1, 0.5, 0.5, 0.7, 0.3];
        let kl = [0.0, 0.8, 0.2, 0.9, 0.1, 0.3];
        let score = |i: usize, k: &str| if k == "teacher_confidence" { conf[i] } else { kl[i] };
        let mut r = rules();
        r.fractions = vec![Fraction::parse("teacher_confidence:top:0.5").unwrap(), Fraction::parse("kl_teacher_student:top:0.34").unwrap()];
        let out = select(&r, &[5; 6], &texts(6), score);
        // Most confident half: 0, 4, then 2 (tied with 3, earlier). Hardest 2: 3, 1.
        assert_eq!(out.kept, vec![true, true, true, true, true, false]);
        assert_eq!(out.selected_by["teacher_confidence:top:0.5"], 3);
        assert_eq!(out.selected_by["kl_teacher_student:top:0.34"], 2);
        assert_eq!(out.removed["not selected"], 1);
        assert!(r.needs_student());
    }

    #[test]
    fn each_record_is_counted_under_the_first_rule_that_drops_it() {
        let mut r = rules();
        r.min_tokens = Some(3);
        r.dedup = Dedup::Exact;
        r.bounds = vec![Bound::parse("teacher_entropy=2", false).unwrap(), Bound::parse("ce_gap=0", true).unwrap()];
        let t: Vec<String> = ["a b", "x  y", "x y", "p", "q", "r"].iter().map(|s| s.to_string()).collect();
        let lengths = [5, 5, 5, 1, 5, 5];
        let entropy = [1.0, 1.0, 1.0, 9.0, 3.0, 1.0];
        let gap = [0.5, 0.5, 0.5, 0.5, 0.5, f64::NAN];
        let out = select(&r, &lengths, &t, |i, k| if k == "teacher_entropy" { entropy[i] } else { gap[i] });
        assert_eq!(out.kept, vec![true, true, false, false, false, false]);
        assert_eq!(out.removed["length"], 1);
        assert_eq!(out.removed["exact_duplicate"], 1);
        assert_eq!(out.removed["max teacher_entropy=2"], 1);
        // A score that could not be computed fails its bound.
        assert_eq!(out.removed["min ce_gap=0"], 1);
    }

    #[test]
    fn histogram_bins_span_min_to_max() {
        let h = histogram(&[0.0, 0.05, 0.5, 1.0]);
        assert_eq!(h["counts"], json!([2, 0, 0, 0, 0, 1, 0, 0, 0, 1]));
        assert_eq!(histogram(&[2.0, 2.0])["counts"][0], json!(2));
        assert_eq!(histogram(&[]), json!(null));
    }
}
