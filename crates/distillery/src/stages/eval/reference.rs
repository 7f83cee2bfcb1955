//! Reference-based scores of short answers, as the SQuAD evaluation script defines them:
//! answers are normalised (lower case, ASCII punctuation and the articles a/an/the removed,
//! whitespace collapsed), exact match is equality after normalisation and F1 is over the
//! normalised words; both take the best over a record's reference answers. An empty answer
//! or reference scores 1 only against another empty one (the SQuAD 2.0 rule).
//!
//! Instruction-tuned models answer in sentences ("The capital of France is Paris."), where
//! exact match is 0 however right the answer: `contains_answer` (a reference's normalised
//! words appear in order, contiguously, in the answer's) is the lenient figure beside it.
use crate::data::records::Record;
use anyhow::{bail, Result};
use serde_json::Value;
use std::collections::HashMap;

/// SQuAD's `normalize_answer`: lower case, no punctuation, no articles, single spaces.
pub fn normalize(s: &str) -> String {
    let lower = s.to_lowercase();
    let no_punct: String = lower.chars().filter(|c| !c.is_ascii_punctuation()).collect();
    // SQuAD then replaces \b(a|an|the)\b by a space: a maximal run of word characters that
    // is an article (so "the" goes, "theme" and "l'the" parts do not).
    let mut spaced = String::with_capacity(no_punct.len());
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        out.push_str(if matches!(run.as_str(), "a" | "an" | "the") { " " } else { run });
        run.clear();
    };
    for c in no_punct.chars() {
        if c.is_alphanumeric() || c == '_' {
            run.push(c);
        } else {
            flush(&mut run, &mut spaced);
            spaced.push(c);
        }
    }
    flush(&mut run, &mut spaced);
    spaced.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn tokens(s: &str) -> Vec<String> {
    normalize(s).split_whitespace().map(String::from).collect()
}

/// 1 when the normalised texts are equal.
pub fn exact_match(prediction: &str, reference: &str) -> f64 {
    f64::from(u8::from(normalize(prediction) == normalize(reference)))
}

/// Harmonic mean of word precision and recall over the normalised words (multiset overlap).
pub fn token_f1(prediction: &str, reference: &str) -> f64 {
    let (p, r) = (tokens(prediction), tokens(reference));
    if p.is_empty() || r.is_empty() {
        return f64::from(u8::from(p == r));
    }
    let mut counts: HashMap<&str, i64> = HashMap::new();
    for t in &r {
        *counts.entry(t).or_default() += 1;
    }
    let mut same = 0;
    for t in &p {
        if let Some(c) = counts.get_mut(t.as_str()).filter(|c| **c > 0) {
            *c -= 1;
            same += 1;
        }
    }
    if same == 0 {
        return 0.0;
    }
    let (precision, recall) = (same as f64 / p.len() as f64, same as f64 / r.len() as f64);
    2.0 * precision * recall / (precision + recall)
}

/// 1 when the reference's normalised words occur contiguously in the prediction's.
pub fn contains_answer(prediction: &str, reference: &str) -> f64 {
    let (p, r) = (tokens(prediction), tokens(reference));
    if r.is_empty() {
        return f64::from(u8::from(p.is_empty()));
    }
    f64::from(u8::from(p.windows(r.len()).any(|w| w == r.as_slice())))
}

/// The best of `score` over the references.
pub fn best_of(prediction: &str, references: &[String], score: fn(&str, &str) -> f64) -> f64 {
    references.iter().map(|r| score(prediction, r)).fold(0.0, f64::max)
}

/// What a targeted record is scored against: short `answer`/`answers` (exact match, F1,
/// contains), or a long `reference` (ROUGE-L); either may go to a judge for grading.
#[derive(Clone, Debug, Default)]
pub struct References {
    pub short: Vec<String>,
    pub long: Option<String>,
}

impl References {
    pub fn of(r: &Record, id: &str) -> Result<References> {
        let mut short = vec![];
        match r.get("answer") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => short.push(s.clone()),
            Some(v) => bail!("record {id}: `answer` must be a string, found {v}"),
        }
        match r.get("answers") {
            None | Some(Value::Null) => {}
            Some(Value::Array(list)) => {
                for v in list {
                    match v {
                        Value::String(s) => short.push(s.clone()),
                        v => bail!("record {id}: `answers` must hold strings, found {v}"),
                    }
                }
            }
            Some(v) => bail!("record {id}: `answers` must be a list of strings, found {v}"),
        }
        let long = match r.get("reference") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(v) => bail!("record {id}: `reference` must be a string, found {v}"),
        };
        Ok(References { short, long })
    }

    /// The text a judge grades against: the long reference, else the short answers joined.
    pub fn for_judge(&self) -> Option<String> {
        self.long.clone().or_else(|| (!self.short.is_empty()).then(|| self.short.join(" / ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn squad_normalisation_drops_case_punctuation_and_articles() {
        assert_eq!(normalize("  The Eiffel   Tower!"), "eiffel tower");
        assert_eq!(normalize("An apple, a day."), "apple day");
        assert_eq!(exact_match("Paris.", "paris"), 1.0);
        assert_eq!(exact_match("It is Paris.", "Paris"), 0.0);
    }

    #[test]
    fn f1_counts_repeated_words_once_each() {
        // prediction "paris paris france" vs reference "paris": precision 1/3, recall 1.
        assert!((token_f1("Paris paris France", "Paris") - 0.5).abs() < 1e-12);
        assert_eq!(token_f1("", ""), 1.0);
        assert_eq!(token_f1("the", "a"), 1.0); // both normalise to nothing
        assert_eq!(token_f1("London", "Paris"), 0.0);
    }

    #[test]
    fn contains_needs_the_words_in_order() {
        assert_eq!(contains_answer("The capital of France is Paris.", "Paris"), 1.0);
        assert_eq!(contains_answer("New York City", "york new"), 0.0);
        assert_eq!(contains_answer("It is 12.", "1"), 0.0);
    }
}
