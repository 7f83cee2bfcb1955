//! The bytes of text each token stands for. Two tokenizations of one text are aligned
//! through them (cross-tokenizer distillation, `data::align`), a model's loss is counted per
//! byte through them (kd-eval's `bits_per_byte`), and a new vocabulary's embeddings are
//! built from a teacher's through them (kd-init `--tokenizer`).
//!
//! Two token spellings cover the tokenizers in use: byte-level BPE (GPT-2, Llama 3, Qwen,
//! SmolLM2: each byte is written as one printable character) and SentencePiece-style
//! (Llama 2, Mistral: `▁` for a space, `<0xNN>` byte fallback). Anything else is read by
//! decoding the single token.
use crate::model::tokenizer::Tok;
use anyhow::Result;
use serde_json::Value;
use std::collections::HashMap;

pub struct TokenBytes {
    pieces: Vec<Vec<u8>>,
    special: Vec<bool>,
}

/// GPT-2's byte-to-character table, inverted: printable Latin-1 bytes stand for themselves,
/// the others are shifted to 256 + n in byte order.
fn byte_level_decoder() -> HashMap<char, u8> {
    let mut map = HashMap::new();
    let mut shifted = 0u32;
    for b in 0..=255u8 {
        let printable = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        let c = if printable {
            char::from(b)
        } else {
            shifted += 1;
            char::from_u32(255 + shifted).expect("valid code point")
        };
        map.insert(c, b);
    }
    map
}

/// Which spelling a tokenizer's decoder says its tokens use.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Spelling {
    ByteLevel,
    SentencePiece,
    Other,
}

fn spelling_of(decoder: &Value) -> Spelling {
    let mut found = Spelling::Other;
    let mut visit = |d: &Value| match d["type"].as_str() {
        Some("ByteLevel") => found = Spelling::ByteLevel,
        Some("ByteFallback" | "Metaspace") if found == Spelling::Other => found = Spelling::SentencePiece,
        Some("Replace") if d["pattern"]["String"].as_str() == Some("▁") && found == Spelling::Other => found = Spelling::SentencePiece,
        _ => {}
    };
    match decoder["type"].as_str() {
        Some("Sequence") => decoder["decoders"].as_array().into_iter().flatten().for_each(&mut visit),
        _ => visit(decoder),
    }
    found
}

fn sentencepiece_bytes(token: &str) -> Vec<u8> {
    // `<0xNN>`: one raw byte (byte fallback).
    if token.len() == 6 && token.starts_with("<0x") && token.ends_with('>') {
        if let Ok(b) = u8::from_str_radix(&token[3..5], 16) {
            return vec![b];
        }
    }
    token.replace('▁', " ").into_bytes()
}

impl TokenBytes {
    /// The table of a tokenizer: one byte string per id (added special tokens spell their
    /// content, which matters only where a text contains it literally).
    pub fn of(tok: &Tok) -> Result<TokenBytes> {
        let inner = tok.inner();
        let decoder = serde_json::to_value(inner.get_decoder())?;
        let spelling = spelling_of(&decoder);
        let bytes_of = byte_level_decoder();
        let n = tok.vocab_size();
        let added = inner.get_added_tokens_decoder();
        let mut pieces = Vec::with_capacity(n);
        let mut special = vec![false; n];
        for id in 0..n as u32 {
            if let Some(a) = added.get(&id) {
                special[id as usize] = a.special;
                pieces.push(a.content.clone().into_bytes());
                continue;
            }
            let token = inner.id_to_token(id).unwrap_or_default();
            let piece = match spelling {
                Spelling::ByteLevel if token.chars().all(|c| bytes_of.contains_key(&c)) => token.chars().map(|c| bytes_of[&c]).collect(),
                Spelling::SentencePiece => sentencepiece_bytes(&token),
                _ => inner.decode(&[id], false).unwrap_or_default().into_bytes(),
            };
            pieces.push(piece);
        }
        Ok(TokenBytes { pieces, special })
    }

    pub fn len(&self) -> usize {
        self.pieces.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    pub fn piece(&self, id: i64) -> &[u8] {
        self.pieces.get(id as usize).map_or(&[], Vec::as_slice)
    }

    pub fn is_special(&self, id: i64) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    /// The id of each spelling (the lowest id where several tokens spell the same bytes),
    /// special tokens included or not; tokens that spell nothing are left out.
    pub fn ids_by_bytes(&self, with_special: bool) -> HashMap<&[u8], i64> {
        let mut map = HashMap::new();
        for id in (0..self.len() as i64).rev() {
            if !self.piece(id).is_empty() && (with_special || !self.is_special(id)) {
                map.insert(self.piece(id), id);
            }
        }
        map
    }

    /// Where each of `ids` sits in `text`: `(start, end)` byte offsets. A special token the
    /// text does not spell at that point (BOS, EOS added by the tokenizer) gets an empty
    /// span; one leading space the tokenizer adds itself (`add_prefix_space`, SentencePiece's
    /// `▁` prefix) is allowed at the start. `None` when the tokens do not spell the text
    /// (normalisers that rewrite it, unknown tokens). The spans may stop short of the end of
    /// `text` (truncated ids).
    pub fn spans(&self, ids: &[i64], text: &str) -> Option<Vec<(usize, usize)>> {
        let text = text.as_bytes();
        let mut pos = 0;
        let mut at_start = true;
        let mut out = Vec::with_capacity(ids.len());
        for &id in ids {
            let piece = self.piece(id);
            let rest = &text[pos..];
            if self.is_special(id) {
                let len = if !piece.is_empty() && rest.starts_with(piece) { piece.len() } else { 0 };
                out.push((pos, pos + len));
                pos += len;
                continue;
            }
            let len = if rest.starts_with(piece) {
                piece.len()
            } else if at_start && piece.first() == Some(&b' ') && rest.starts_with(&piece[1..]) {
                piece.len() - 1
            } else {
                return None;
            };
            out.push((pos, pos + len));
            pos += len;
            at_start = false;
        }
        Some(out)
    }

    /// Bytes and characters of `text` a sequence's targets `ids[from..]` cover (bits per
    /// byte and per character), from their spans; `None` when the tokens do not spell it.
    pub fn covered(&self, ids: &[i64], text: &str, from: usize) -> Option<(usize, usize)> {
        let spans = self.spans(ids, text)?;
        let start = spans.get(from).map_or(text.len(), |s| s.0);
        let end = spans.last().map_or(0, |s| s.1);
        let bytes = &text.as_bytes()[start.min(end)..end];
        let chars = bytes.iter().filter(|&&b| (b & 0xC0) != 0x80).count();
        Some((bytes.len(), chars))
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_table_is_gpt2s() {
        let m = byte_level_decoder();
        assert_eq!(m.len(), 256);
        assert_eq!(m[&'Ġ'], b' ');
        assert_eq!(m[&'Ċ'], b'\n');
        assert_eq!(m[&'a'], b'a');
        assert_eq!(m[&'Ã'], 0xC3);
    }

    #[test]
    fn sentencepiece_spelling() {
        assert_eq!(sentencepiece_bytes("▁the"), b" the");
        assert_eq!(sentencepiece_bytes("<0x0A>"), b"\n");
        assert_eq!(sentencepiece_bytes("<0xE2>"), vec![0xE2]);
    }

    #[test]
    fn spans_allow_one_prefix_space_and_skip_added_specials() {
        let tb = TokenBytes {
            pieces: vec![b"<s>".to_vec(), b" In".to_vec(), b" the".to_vec(), b" beg".to_vec(), b"inning".to_vec()],
            special: vec![true, false, false, false, false],
        };
        assert_eq!(tb.spans(&[0, 1, 2], "In the"), Some(vec![(0, 0), (0, 2), (2, 6)]));
        // The space is allowed only at the start.
        assert_eq!(tb.spans(&[1, 1], "InIn"), None);
        assert_eq!(tb.covered(&[0, 1, 2, 3, 4], "In the beginning", 1), Some((16, 16)));
        assert_eq!(tb.covered(&[1, 2], "In the", 1), Some((4, 4)));
    }
}
