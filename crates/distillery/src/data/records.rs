//! JSON Lines records exchanged between stages (see CONTRACT.md). A record is kept as a JSON
//! object so that fields a stage does not know pass through untouched.
use crate::base::io::write_via_temp;
use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use std::collections::HashSet;
use std::io::{BufRead, BufWriter, Read, Write};
use std::path::Path;

pub type Record = Map<String, Value>;

/// Reads every record, with errors naming the file and line: malformed JSON, a line that is
/// not an object, a missing or duplicate `id`, an empty file.
pub fn read_jsonl(path: &Path) -> Result<Vec<Record>> {
    Ok(read_jsonl_numbered(path)?.into_iter().map(|(_, r)| r).collect())
}

/// The longest line a record may take: far above any real record, low enough that a file
/// without newlines (a binary file, a corrupt copy) fails fast instead of filling memory.
pub const MAX_LINE_BYTES: usize = 64 << 20;

/// A JSON value whose objects may not repeat a key: `{"id": "a", "id": "b"}` is an error
/// (serde_json would keep the last silently). Nesting is bounded by serde_json's recursion
/// limit (128).
struct Strict(Value);

impl<'de> serde::Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Strict, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> std::result::Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> std::result::Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> std::result::Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> std::result::Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_str<E>(self, v: &str) -> std::result::Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> std::result::Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> std::result::Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Value, A::Error> {
        let mut v = vec![];
        while let Some(Strict(x)) = seq.next_element()? {
            v.push(x);
        }
        Ok(Value::Array(v))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> std::result::Result<Value, A::Error> {
        let mut m = Map::new();
        while let Some(k) = map.next_key::<String>()? {
            let Strict(v) = map.next_value()?;
            if m.contains_key(&k) {
                return Err(serde::de::Error::custom(format!("duplicate key `{k}`")));
            }
            m.insert(k, v);
        }
        Ok(Value::Object(m))
    }
}

/// Parses one JSON text strictly (no repeated keys).
pub fn parse_strict(text: &str) -> serde_json::Result<Value> {
    serde_json::from_str::<Strict>(text).map(|s| s.0)
}

/// As [`read_jsonl`], with each record's 1-based line number for later error messages.
pub fn read_jsonl_numbered(path: &Path) -> Result<Vec<(usize, Record)>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut reader = std::io::BufReader::new(file);
    let mut records = vec![];
    let mut ids = HashSet::new();
    let mut buf = vec![];
    for n in 1.. {
        buf.clear();
        let read = (&mut reader).take(MAX_LINE_BYTES as u64 + 1).read_until(b'\n', &mut buf).with_context(|| format!("{}:{n}: read error", path.display()))?;
        if read == 0 {
            break;
        }
        if buf.len() > MAX_LINE_BYTES {
            bail!("{}:{n}: line longer than {} MiB; a record must fit on one line of at most that size", path.display(), MAX_LINE_BYTES >> 20);
        }
        if let Some(pos) = buf.iter().position(|&b| b == 0) {
            bail!("{}:{n}: NUL byte at column {} (a binary or corrupt file?)", path.display(), pos + 1);
        }
        let line = std::str::from_utf8(&buf).map_err(|e| anyhow::anyhow!("{}:{n}: not valid UTF-8 (at byte {} of the line)", path.display(), e.valid_up_to()))?;
        if line.trim().is_empty() {
            continue;
        }
        let value = parse_strict(line).with_context(|| format!("{}:{n}: malformed JSON", path.display()))?;
        let Value::Object(rec) = value else {
            bail!("{}:{n}: expected a JSON object", path.display());
        };
        let id = match rec.get("id") {
            Some(Value::String(s)) => s.clone(),
            Some(_) => bail!("{}:{n}: field `id` must be a string", path.display()),
            None => bail!("{}:{n}: missing required field `id`", path.display()),
        };
        if !ids.insert(id.clone()) {
            bail!("{}:{n}: duplicate id `{id}`", path.display());
        }
        records.push((n, rec));
    }
    if records.is_empty() {
        bail!("{}: no records (empty file)", path.display());
    }
    Ok(records)
}

/// Writes lines atomically, each followed by a newline: kd-merge copies records this way,
/// byte for byte, without parsing and printing them again.
pub fn write_lines(path: &Path, lines: &[&str]) -> Result<()> {
    write_via_temp(path, |tmp| {
        let mut w = BufWriter::new(std::fs::File::create(tmp)?);
        for l in lines {
            w.write_all(l.as_bytes())?;
            w.write_all(b"\n")?;
        }
        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        Ok(())
    })
}

/// Writes records atomically, one compact JSON object per line.
pub fn write_jsonl(path: &Path, records: &[Record]) -> Result<()> {
    write_via_temp(path, |tmp| {
        let mut w = BufWriter::new(std::fs::File::create(tmp)?);
        for r in records {
            serde_json::to_writer(&mut w, r)?;
            w.write_all(b"\n")?;
        }
        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        Ok(())
    })
}

pub fn id_of(rec: &Record) -> &str {
    rec.get("id").and_then(Value::as_str).unwrap_or("?")
}

pub fn str_field<'a>(rec: &'a Record, key: &str) -> Result<Option<&'a str>> {
    match rec.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => bail!("record `{}`: field `{key}` must be a string", id_of(rec)),
    }
}

/// The prompt of a record that must have one.
pub fn prompt_of(rec: &Record, path: &Path, line: usize) -> Result<String> {
    str_field(rec, "prompt")?
        .or(str_field(rec, "text")?)
        .map(String::from)
        .with_context(|| format!("{}:{line}: record `{}` has no `prompt` (or `text`)", path.display(), id_of(rec)))
}

/// A record's text split as (context, continuation): `text` is all continuation-free
/// context; `prompt` + `completion` is kept apart so callers can mask the prompt.
pub fn text_parts(rec: &Record) -> Result<(String, Option<String>)> {
    if let Some(t) = str_field(rec, "text")? {
        return Ok((t.to_string(), None));
    }
    match (str_field(rec, "prompt")?, str_field(rec, "completion")?) {
        (Some(p), c) => Ok((p.to_string(), c.map(String::from))),
        (None, _) => bail!("record `{}` has neither `text` nor `prompt`", id_of(rec)),
    }
}

/// The whole text of a record: `text`, or `prompt` + `completion`.
pub fn full_text(rec: &Record) -> Result<String> {
    let (a, b) = text_parts(rec)?;
    Ok(match b {
        Some(b) => a + &b,
        None => a,
    })
}

/// Integer id list field (`prompt_ids`, `completion_ids`), when present.
pub fn ids_field(rec: &Record, key: &str) -> Result<Option<Vec<i64>>> {
    match rec.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_i64().with_context(|| format!("record `{}`: `{key}` must hold integers", id_of(rec))))
            .collect::<Result<Vec<_>>>()
            .map(Some),
        Some(_) => bail!("record `{}`: `{key}` must be an array of integers", id_of(rec)),
    }
}
