//! Two tokenizations of one text, aligned: the spans of text both cut at the same byte
//! offsets (cross-tokenizer distillation). Within a span each side has one or more tokens;
//! the first token of every span is predicted, on both sides, from the same text.
use crate::data::examples::Example;
use crate::data::records::{ids_field, text_parts, Record};
use crate::model::token_bytes::TokenBytes;
use crate::model::tokenizer::Tok;
use anyhow::Result;
use rayon::prelude::*;

/// One aligned span: the indices of the tokens (into each side's ids) that spell it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    pub student: Vec<usize>,
    pub teacher: Vec<usize>,
}

/// Groups the tokens of two tokenizations of one text by common boundaries. `s` and `t` are
/// each token's `(start, end)` byte span (from [`TokenBytes::spans`]); empty tokens (BOS
/// and other specials the text does not spell) belong to no group. Stops at the last
/// boundary both sides reach (a truncated side ends the alignment).
pub fn align_spans(s: &[(usize, usize)], t: &[(usize, usize)]) -> Vec<Group> {
    let s: Vec<(usize, usize)> = (0..s.len()).filter(|&i| s[i].1 > s[i].0).map(|i| (i, s[i].1)).collect();
    let t: Vec<(usize, usize)> = (0..t.len()).filter(|&j| t[j].1 > t[j].0).map(|j| (j, t[j].1)).collect();
    let (mut i, mut j) = (0, 0);
    let mut groups = vec![];
    let mut cur = Group { student: vec![], teacher: vec![] };
    while i < s.len() && j < t.len() {
        // Take the token that ends first (both, when they end together).
        let (se, te) = (s[i].1, t[j].1);
        if se <= te {
            cur.student.push(s[i].0);
            i += 1;
        }
        if te <= se {
            cur.teacher.push(t[j].0);
            j += 1;
        }
        if se == te {
            groups.push(std::mem::replace(&mut cur, Group { student: vec![], teacher: vec![] }));
        }
    }
    groups
}

/// A record's text as the one record-to-ids rule splits it (`prompt` with special tokens,
/// `completion` without, or `text` whole), tokenized by one tokenizer, with each token's
/// span in the joined text.
pub struct Spelled {
    pub ids: Vec<i64>,
    pub prompt_len: usize,
    pub spans: Vec<(usize, usize)>,
}

/// Tokenizes `prompt` (with special tokens) and `completion` (without) and places every
/// token in `prompt + completion`. `None` when the tokens do not spell the text.
pub fn spell(tok: &Tok, bytes: &TokenBytes, prompt: &str, completion: Option<&str>) -> Result<Option<Spelled>> {
    let p_ids = tok.encode(prompt, true)?;
    let Some(mut spans) = bytes.spans(&p_ids, prompt) else { return Ok(None) };
    if spans.last().is_some_and(|s| s.1 != prompt.len()) {
        return Ok(None);
    }
    let mut ids = p_ids;
    let prompt_len = ids.len();
    if let Some(c) = completion {
        let c_ids = tok.encode(c, false)?;
        let Some(c_spans) = bytes.spans(&c_ids, c) else { return Ok(None) };
        if c_spans.last().is_some_and(|s| s.1 != c.len()) {
            return Ok(None);
        }
        spans.extend(c_spans.into_iter().map(|(a, b)| (a + prompt.len(), b + prompt.len())));
        ids.extend(c_ids);
    }
    Ok(Some(Spelled { ids, prompt_len, spans }))
}

/// A training example's teacher side: the teacher's ids of the same text (cut after the
/// last span used) and the spans the loss covers.
#[derive(Clone, Debug, Default)]
pub struct CrossExample {
    pub teacher_ids: Vec<i64>,
    /// The first teacher token with a prediction: 1 for a live teacher (token j is predicted
    /// at position j - 1), the stored prompt length for stored rows (row j - prompt_len).
    pub rows_from: usize,
    /// Spans whose student tokens are all loss targets and whose teacher tokens all have a
    /// predicting position.
    pub groups: Vec<Group>,
}

/// A record as its stored `prompt_ids` + `completion_ids` spell it (the ids stored teacher
/// rows were computed on). The prompt's ids may come from a chat template, so only the
/// completion is placed token by token; the prompt counts as one span ending where the
/// completion starts (the loss never covers it).
pub fn spell_stored(bytes: &TokenBytes, rec: &Record) -> Result<Option<Spelled>> {
    let (Some(p_ids), Some(c_ids)) = (ids_field(rec, "prompt_ids")?, ids_field(rec, "completion_ids")?) else { return Ok(None) };
    let (prompt, Some(completion)) = text_parts(rec)? else { return Ok(None) };
    let Some(c_spans) = bytes.spans(&c_ids, &completion) else { return Ok(None) };
    if c_spans.last().is_some_and(|s| s.1 != completion.len()) {
        return Ok(None);
    }
    let p = prompt.len();
    let mut spans: Vec<(usize, usize)> = (0..p_ids.len()).map(|i| if i + 1 == p_ids.len() { (0, p) } else { (0, 0) }).collect();
    spans.extend(c_spans.into_iter().map(|(a, b)| (a + p, b + p)));
    Ok(Some(Spelled { prompt_len: p_ids.len(), ids: [p_ids, c_ids].concat(), spans }))
}

/// How the teacher reads a record.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum TeacherIds {
    /// Its tokenizer on the record's text (a live teacher).
    Tokenized,
    /// The record's stored ids (stored teacher rows).
    Stored,
}

/// The teacher side of every example: the record's text as the teacher reads it, aligned
/// with the student's tokens. Returns them with the number of examples whose text either
/// side does not spell exactly (they train on CE alone).
pub fn cross_examples(
    examples: &[Example],
    records: &[(usize, Record)],
    student: (&Tok, &TokenBytes),
    teacher: (&Tok, &TokenBytes),
    teacher_ids: TeacherIds,
) -> Result<(Vec<CrossExample>, usize)> {
    let out: Vec<Option<CrossExample>> = examples
        .par_iter()
        .map(|ex| -> Result<Option<CrossExample>> {
            let rec = &records[ex.record].1;
            let (prompt, completion) = text_parts(rec)?;
            let t = match teacher_ids {
                TeacherIds::Tokenized => spell(teacher.0, teacher.1, &prompt, completion.as_deref())?,
                TeacherIds::Stored => spell_stored(teacher.1, rec)?,
            };
            let (Some(s), Some(t)) = (spell(student.0, student.1, &prompt, completion.as_deref())?, t) else {
                return Ok(None);
            };
            let rows_from = match teacher_ids {
                TeacherIds::Tokenized => 1,
                TeacherIds::Stored => t.prompt_len,
            };
            // The student's ids must be the example's (the same rule), cut at seq_len.
            if !s.ids.starts_with(&ex.ids) {
                return Ok(None);
            }
            let first = ex.loss_from.max(1);
            let groups: Vec<Group> = align_spans(&s.spans[..ex.ids.len()], &t.spans)
                .into_iter()
                .filter(|g| g.student.iter().all(|&i| i >= first) && g.teacher.iter().all(|&j| j >= rows_from.max(1)))
                .collect();
            let keep = groups.iter().flat_map(|g| g.teacher.iter()).max().map_or(0, |&j| j + 1);
            Ok(Some(CrossExample { teacher_ids: t.ids[..keep].to_vec(), rows_from, groups }))
        })
        .collect::<Result<_>>()?;
    let unaligned = out.iter().filter(|c| c.is_none()).count();
    Ok((out.into_iter().map(Option::unwrap_or_default).collect(), unaligned))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spans(lens: &[usize]) -> Vec<(usize, usize)> {
        let mut at = 0;
        lens.iter()
            .map(|&l| {
                at += l;
                (at - l, at)
            })
            .collect()
    }

    #[test]
    fn one_to_one_many_to_one_and_many_to_many() {
        // "abcdef": student a|bc|d|ef, teacher ab|c|def -> spans [abc], [def]
        let g = align_spans(&spans(&[1, 2, 1, 2]), &spans(&[2, 1, 3]));
        assert_eq!(g, vec![Group { student: vec![0, 1], teacher: vec![0, 1] }, Group { student: vec![2, 3], teacher: vec![2] }]);
        // identical tokenizations: one group per token
        let g = align_spans(&spans(&[1, 3, 2]), &spans(&[1, 3, 2]));
        assert_eq!(g.len(), 3);
        assert!(g.iter().enumerate().all(|(k, g)| g.student == vec![k] && g.teacher == vec![k]));
    }

    #[test]
    fn empty_tokens_belong_to_no_group_and_a_truncated_side_ends_it() {
        // student: BOS (empty) then ab|cd; teacher: abc|d|e but cut after "abc"
        let s = vec![(0, 0), (0, 2), (2, 4)];
        let t = vec![(0, 3)];
        assert_eq!(align_spans(&s, &t), vec![]);
        let t = vec![(0, 3), (3, 4), (4, 5)];
        assert_eq!(align_spans(&s, &t), vec![Group { student: vec![1, 2], teacher: vec![0, 1] }]);
    }
}
