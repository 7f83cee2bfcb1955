//! Teacher-forced scoring through llama-cpp-python's server (`python -m llama_cpp.server`),
//! the one llama.cpp-based server that scores given text: `/v1/completions` with `echo` and
//! `logprobs`. Its answers have three quirks, read from its source (`llama_cpp/llama.py`,
//! `_create_completion`, version 0.3.x) and checked by the capability probe against its own
//! next-token answers:
//!
//! * **Text, not ids.** The prompt is a string the server tokenizes itself (special tokens
//!   parsed, a BOS added when the model asks for one), and log-probabilities are keyed by
//!   token *strings* (each token's bytes decoded as UTF-8 with invalid bytes dropped, control
//!   tokens empty). The ids are sent as their decoded text; the echoed token strings are
//!   checked against the ids' strings, so a text that does not tokenize back to its ids is
//!   refused by name, never misaligned. A string maps back to an id when exactly one token of
//!   the vocabulary writes it; the others (`""` for every control token and for the bytes
//!   that end inside a UTF-8 character) are left out of the row and counted: their mass
//!   joins the tail.
//! * **Rows by position, not by token.** The entry echoed for the token at position `i` of
//!   the sequence after a leading BOS is removed carries the distribution computed *at* that
//!   token, the one predicting the next token. With a leading BOS (removed first) that is the
//!   usual layout; without one every row sits one token early and `token_logprobs` scores
//!   each token by the distribution that follows it. Both are read by position: the row
//!   predicting token `t` is the entry of the token at `t - 1`. The token's own log-probability
//!   is `token_logprobs` of that entry only with a leading BOS; otherwise it is read from the
//!   row (absent when outside the top-K).
//! * **Gaps.** The first entry is blanked (the OpenAI convention), and every BOS token in the
//!   sequence is skipped with its row. Those rows are fetched one by one, each as the
//!   next-token distribution of its prefix (a plain completion of one token).
use super::engine::TopRow;
use crate::model::token_bytes::TokenBytes;
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::collections::HashMap;

/// Extra log-probabilities asked for beyond K, so that K remain after the ambiguous strings
/// are left out.
pub const MARGIN: usize = 8;

/// Each token's string as llama-cpp-python writes it, and the ids that strings name.
pub struct TokenStrings {
    strings: Vec<String>,
    /// `Some(id)` when exactly one token writes the string, `None` when several do.
    ids: HashMap<String, Option<i64>>,
}

/// `bytes` decoded as UTF-8 with invalid sequences dropped (Python's `errors="ignore"`).
fn utf8_ignoring_invalid(bytes: &[u8]) -> String {
    bytes.utf8_chunks().map(|c| c.valid()).collect()
}

impl TokenStrings {
    pub fn new(bytes: &TokenBytes) -> TokenStrings {
        let strings: Vec<String> = (0..bytes.len() as i64)
            .map(|id| if bytes.is_special(id) { String::new() } else { utf8_ignoring_invalid(bytes.piece(id)) })
            .collect();
        let mut ids: HashMap<String, Option<i64>> = HashMap::new();
        for (id, s) in strings.iter().enumerate() {
            ids.entry(s.clone()).and_modify(|e| *e = None).or_insert(Some(id as i64));
        }
        TokenStrings { strings, ids }
    }

    pub fn string(&self, id: i64) -> &str {
        self.strings.get(id as usize).map_or("", String::as_str)
    }

    /// The one token that writes `s`, if exactly one does.
    pub fn id(&self, s: &str) -> Option<i64> {
        self.ids.get(s).copied().flatten()
    }

    /// How many strings name several tokens (reported by the probe).
    pub fn ambiguous(&self) -> usize {
        self.ids.values().filter(|v| v.is_none()).count()
    }
}

/// The echo request scoring `text` (one token is generated and ignored: `max_tokens` 0 means
/// "up to the context" to this server).
pub fn score_body(text: &str, k: usize, model: &str) -> Value {
    json!({"model": model, "prompt": text, "max_tokens": 1, "temperature": 0.0, "echo": true, "logprobs": k, "seed": 0})
}

/// The request for the next-token distribution after `text` (its first generated token's
/// row is computed after the whole prompt, whatever the BOS).
pub fn next_body(text: &str, k: usize, model: &str) -> Value {
    json!({"model": model, "prompt": text, "max_tokens": 1, "temperature": 0.0, "logprobs": k, "seed": 0})
}

/// Rows and token log-probabilities for targets `from..seq.len()`.
#[derive(Debug, Default, PartialEq)]
pub struct EchoScored {
    /// The row predicting each target (best first); `None` where the answer has no row.
    pub rows: Vec<Option<TopRow>>,
    /// The target token's own log-probability, where the answer gives it.
    pub targets: Vec<Option<f64>>,
    /// Top entries left out because their string names several tokens.
    pub dropped: usize,
}

/// A `top_logprobs` map of strings to log-probabilities, as (id, log-probability) pairs of
/// the strings that name one token; the count of those left out.
fn map_row(m: &Value, strings: &TokenStrings) -> Result<(TopRow, usize)> {
    let m = m.as_object().context("a top_logprobs entry is not an object")?;
    let (mut row, mut dropped) = (vec![], 0);
    for (s, lp) in m {
        let lp = lp.as_f64().context("a top log-probability is not a number")?;
        match strings.id(s) {
            Some(id) => row.push((id, lp)),
            None => dropped += 1,
        }
    }
    Ok((row, dropped))
}

/// Best first, each id once.
fn tidy(mut row: TopRow) -> TopRow {
    row.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut seen = std::collections::HashSet::new();
    row.retain(|(id, _)| seen.insert(*id));
    row
}

/// Reads an echo answer for the token sequence `seq` the server evaluated (the module's
/// comment gives the layout).
pub fn parse_echo(v: &Value, seq: &[i64], bos: Option<i64>, strings: &TokenStrings, from: usize) -> Result<EchoScored> {
    ensure!(from >= 1 && from <= seq.len(), "scoring from token {from} of {}", seq.len());
    let lp = &v["choices"][0]["logprobs"];
    let tokens = lp["tokens"].as_array().context("the answer has no `choices[0].logprobs.tokens` (was `logprobs` ignored?)")?;
    let token_lps = lp["token_logprobs"].as_array().context("the answer has no `logprobs.token_logprobs`")?;
    let tops = lp["top_logprobs"].as_array().context("the answer has no `logprobs.top_logprobs`")?;
    let leading_bos = bos.is_some() && seq.first().copied() == bos;
    let all = &seq[leading_bos as usize..];
    // The entry of each token of `all` (BOS tokens have none), checked against its string.
    let mut entry = vec![None; all.len()];
    let mut e = 0;
    for (i, &id) in all.iter().enumerate() {
        if Some(id) == bos {
            continue;
        }
        let got = tokens.get(e).and_then(Value::as_str).with_context(|| format!("the answer echoes {} tokens, the text has more", tokens.len()))?;
        if got != strings.string(id) {
            bail!(
                "the server tokenized the text differently from its ids: token {} is {:?} (id {id}) but the server echoed {got:?}; \
                 such ids (not the tokenizer's own tokenization of their text) can be scored through vLLM or SGLang, which take ids",
                i + leading_bos as usize,
                strings.string(id)
            );
        }
        entry[i] = Some(e);
        e += 1;
    }
    // One more entry may follow: the token the server generated.
    ensure!(tokens.len() <= e + 1, "the answer echoes {} tokens for a text of {e}", tokens.len());
    let mut out = EchoScored::default();
    for t in from..seq.len() {
        let Some(e) = entry[t - 1] else {
            out.rows.push(None);
            out.targets.push(None);
            continue;
        };
        let Some(top) = tops.get(e).filter(|r| !r.is_null()) else {
            out.rows.push(None);
            out.targets.push(None);
            continue;
        };
        let (mut row, dropped) = map_row(top, strings)?;
        out.dropped += dropped;
        let actual = if leading_bos {
            // The entry's own log-probability is the target's (the usual layout).
            let a = token_lps.get(e).and_then(Value::as_f64).context("a `token_logprobs` entry is not a number")?;
            row.push((seq[t], a));
            Some(a)
        } else {
            row.iter().find(|(id, _)| *id == seq[t]).map(|(_, lp)| *lp)
        };
        out.rows.push(Some(tidy(row)));
        out.targets.push(actual);
    }
    Ok(out)
}

/// The next-token row of a plain one-token completion (`next_body`), with the log-probability
/// of `target` when the row holds it; the count of entries left out.
pub fn parse_next(v: &Value, strings: &TokenStrings, target: i64) -> Result<(TopRow, Option<f64>, usize)> {
    let top = v["choices"][0]["logprobs"]["top_logprobs"]
        .get(0)
        .filter(|r| !r.is_null())
        .context("the answer has no `choices[0].logprobs.top_logprobs[0]`")?;
    let (row, dropped) = map_row(top, strings)?;
    let row = tidy(row);
    let actual = row.iter().find(|(id, _)| *id == target).map(|(_, lp)| *lp);
    Ok((row, actual, dropped))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vocabulary of single characters plus a control token (id 0, BOS) and a byte that is
    /// only part of a UTF-8 character (id 5, `\xc3`), which writes "" like the control token.
    fn strings() -> TokenStrings {
        let mut ids: HashMap<String, Option<i64>> = HashMap::new();
        let strings: Vec<String> = ["", "a", "b", "c", "d", ""].iter().map(|s| s.to_string()).collect();
        for (i, s) in strings.iter().enumerate() {
            ids.entry(s.clone()).and_modify(|e| *e = None).or_insert(Some(i as i64));
        }
        TokenStrings { strings, ids }
    }

    /// What llama-cpp-python 0.3 answers for `seq` with rows `rows[r]` (the distribution after
    /// token r), as its `_create_completion` builds the echo answer.
    fn answer(seq: &[i64], rows: &[Vec<(i64, f64)>], bos: i64, st: &TokenStrings) -> Value {
        let all: Vec<i64> = seq[(seq[0] == bos) as usize..].to_vec();
        let (mut tokens, mut lps, mut tops) = (vec![], vec![], vec![]);
        for (i, &tok) in all.iter().enumerate().take(rows.len()) {
            if tok == bos {
                continue;
            }
            tokens.push(json!(st.string(tok)));
            let lp_of = |id: i64| rows[i].iter().find(|r| r.0 == id).map_or(-20.0, |r| r.1);
            lps.push(json!(lp_of(tok)));
            let mut m = serde_json::Map::new();
            for &(id, lp) in &rows[i] {
                m.insert(st.string(id).to_string(), json!(lp));
            }
            m.insert(st.string(tok).to_string(), json!(lp_of(tok)));
            tops.push(Value::Object(m));
        }
        lps[0] = Value::Null;
        tops[0] = Value::Null;
        json!({"choices": [{"text": "", "logprobs": {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops}}]})
    }

    fn rows(n: usize) -> Vec<Vec<(i64, f64)>> {
        // Row r predicts token r + 1 of the sequences below; distinct values per row.
        (0..n).map(|r| vec![(1, -0.1 - r as f64), (2, -1.0 - r as f64), (3, -2.0 - r as f64), (5, -3.0)]).collect()
    }

    #[test]
    fn rows_are_read_by_position_with_and_without_a_leading_bos() {
        let st = strings();
        // Without BOS: rows sit one token early; the target's log-probability comes from the row.
        let seq = [1, 2, 3, 1, 4];
        let r = rows(seq.len());
        let got = parse_echo(&answer(&seq, &r, 0, &st), &seq, Some(0), &st, 1).unwrap();
        assert_eq!(got.rows[0], None, "the first entry is blanked");
        for t in 2..seq.len() {
            let want: TopRow = r[t - 1].iter().filter(|e| e.0 != 5).copied().collect();
            assert_eq!(got.rows[t - 1].as_ref().unwrap(), &want, "target {t}");
        }
        assert_eq!(got.targets[1], Some(-2.0 - 1.0), "token 3, predicted by row 1, is found in the row");
        assert_eq!(got.targets[3], None, "token 4 is outside the row");
        assert_eq!(got.dropped, 3, "the \"\" entries name two tokens");
        // With a leading BOS the entries line up and carry the target's own log-probability.
        let seq = [0, 1, 2, 4, 3];
        let r = rows(seq.len());
        let got = parse_echo(&answer(&seq, &r, 0, &st), &seq, Some(0), &st, 2).unwrap();
        assert_eq!(got.rows.len(), 3);
        assert_eq!(got.targets[1], Some(-20.0), "token 4's own log-probability, outside the top");
        assert!(got.rows[1].as_ref().unwrap().contains(&(4, -20.0)));
        assert_eq!(&got.rows[0].as_ref().unwrap()[..1], &[(1, -1.1)]);
    }

    #[test]
    fn a_bos_inside_the_sequence_leaves_a_gap() {
        let st = strings();
        let seq = [0, 1, 2, 0, 3, 4];
        let r = rows(seq.len());
        let got = parse_echo(&answer(&seq, &r, 0, &st), &seq, Some(0), &st, 1).unwrap();
        // The BOS at position 3 is skipped with the entry that carries the row predicting it.
        let present: Vec<bool> = got.rows.iter().map(Option::is_some).collect();
        assert_eq!(present, [false, true, false, true, true]);
        assert_eq!(got.rows[4].as_ref().unwrap()[0], (1, -0.1 - 4.0));
    }

    #[test]
    fn a_text_that_tokenizes_to_other_ids_is_refused() {
        let st = strings();
        let seq = [1, 2, 3];
        let mut v = answer(&seq, &rows(3), 0, &st);
        v["choices"][0]["logprobs"]["tokens"][1] = json!("bc");
        let err = parse_echo(&v, &seq, Some(0), &st, 1).unwrap_err().to_string();
        assert!(err.contains("token 1 is \"b\"") && err.contains("\"bc\""), "{err}");
    }

    #[test]
    fn strings_name_an_id_only_when_one_token_writes_them() {
        let st = strings();
        assert_eq!(st.id("a"), Some(1));
        assert_eq!(st.id(""), None);
        assert_eq!(st.ambiguous(), 1);
        assert_eq!(utf8_ignoring_invalid(b"a\xc3b\xe2\x80"), "ab");
        assert_eq!(utf8_ignoring_invalid("é".as_bytes()), "é");
        let next = json!({"choices": [{"logprobs": {"top_logprobs": [{"a": -0.5, "c": -1.0, "": -2.0}]}}]});
        assert_eq!(parse_next(&next, &st, 3).unwrap(), (vec![(1, -0.5), (3, -1.0)], Some(-1.0), 1));
    }
}
