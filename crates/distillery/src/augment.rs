//! Word-level augmentation operations. Each is a pure function of the text, a ratio and a
//! seeded stream, so outputs are reproducible and testable exactly.
use crate::rng::SplitMix64;

fn words(text: &str) -> Vec<&str> {
    text.split_whitespace().collect()
}

/// How many words an operation touches: `ratio` of them, at least one.
fn count(n: usize, ratio: f64) -> usize {
    ((n as f64 * ratio).round() as usize).clamp(1, n.max(1))
}

/// Drops each word with probability `ratio`, always keeping at least one.
pub fn delete_words(text: &str, ratio: f64, rng: &mut SplitMix64) -> String {
    let w = words(text);
    let kept: Vec<&str> = w.iter().copied().filter(|_| rng.next_f64() >= ratio).collect();
    if kept.is_empty() {
        return w.get(rng.below(w.len().max(1))).copied().unwrap_or("").to_string();
    }
    kept.join(" ")
}

/// Swaps `ratio * n` random pairs of words.
pub fn swap_words(text: &str, ratio: f64, rng: &mut SplitMix64) -> String {
    let mut w = words(text);
    if w.len() < 2 {
        return w.join(" ");
    }
    for _ in 0..count(w.len(), ratio) {
        let (a, b) = (rng.below(w.len()), rng.below(w.len()));
        w.swap(a, b);
    }
    w.join(" ")
}

/// Where a span of `ratio * n` words starts: `(start, len)`.
pub fn pick_span(n: usize, ratio: f64, rng: &mut SplitMix64) -> (usize, usize) {
    let len = count(n, ratio);
    let start = rng.below(n - len + 1);
    (start, len)
}

/// Replaces one random span of `ratio * n` words with `mask`.
pub fn mask_span(text: &str, ratio: f64, mask: &str, rng: &mut SplitMix64) -> String {
    let w = words(text);
    if w.is_empty() {
        return String::new();
    }
    let (start, len) = pick_span(w.len(), ratio, rng);
    let mut out: Vec<&str> = w[..start].to_vec();
    out.push(mask);
    out.extend_from_slice(&w[start + len..]);
    out.join(" ")
}

/// Splits a text around a span for teacher infilling: (prefix, removed span, suffix).
pub fn split_for_infill(text: &str, ratio: f64, rng: &mut SplitMix64) -> (String, String, String) {
    let w = words(text);
    if w.len() < 2 {
        return (text.to_string(), String::new(), String::new());
    }
    // The span never starts at 0, so the teacher always has some left context.
    let (start, len) = pick_span(w.len() - 1, ratio, rng);
    let start = start + 1;
    (w[..start].join(" "), w[start..start + len].join(" "), w[start + len..].join(" "))
}

/// Fills a template's `{text}` placeholder.
pub fn fill_template(template: &str, text: &str) -> String {
    template.replace("{text}", text)
}
