//! The judge: a model, here or behind a server, that compares two models' answers to the
//! same prompts (pairwise, as AlpacaEval and MT-Bench do) or grades one answer against a
//! reference, through an editable template (pipelines/templates/judge.json).
//!
//! The verdict is read from the judge's log-probabilities, not from sampled text: the label
//! ("A", "B", "tie"; "correct", "partially", "wrong") whose first token is most likely as the
//! first token of the judge's reply wins. A pairwise question is asked in both orders, and the
//! two verdicts, mapped back to the models, are combined: the same winner twice wins, anything
//! else (including a disagreement) is a tie. That removes position bias from the result and
//! measures it (`self_agreement`, `first_position_rate`).
use crate::base::stats::{bootstrap_mean_ci, wilson_interval, BOOTSTRAP_SEED};
use crate::model::decode::Sampling;
use crate::model::tokenizer::{chat_template, render_chat, Tok};
use crate::model::ModelFiles;
use crate::teacher::served::ServedTeacher;
use crate::teacher::{LocalTeacher, Predictions, Query, Teacher};
use crate::base::rng::SplitMix64;
use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::Path;
use tch::{Device, Kind};

/// The template kd-eval uses unless `--judge-template` names another.
pub const DEFAULT_TEMPLATE: &str = include_str!("../../../../../pipelines/templates/judge.json");

#[derive(Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct PairLabels {
    pub a: String,
    pub b: String,
    pub tie: String,
}

#[derive(Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct GradeLabels {
    pub correct: String,
    pub partial: String,
    pub wrong: String,
}

/// The judge's prompts and the words its verdicts are read from.
#[derive(Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct JudgeTemplate {
    #[serde(default)]
    pub about: Option<String>,
    /// The system turn before every question (none when empty).
    #[serde(default)]
    pub system: Option<String>,
    /// Filled with {question}, {answer_a}, {answer_b}.
    pub pairwise: String,
    pub pairwise_labels: PairLabels,
    /// The start of the judge's reply, written for it (e.g. "Better answer:"): the label is
    /// read as the word that follows. Without one, as the reply's first token, which small
    /// judges rarely make a label (they begin "The answer is ...").
    #[serde(default)]
    pub pairwise_reply: Option<String>,
    /// Filled with {question}, {reference}, {answer}.
    pub grade: String,
    pub grade_labels: GradeLabels,
    #[serde(default)]
    pub grade_reply: Option<String>,
}

impl JudgeTemplate {
    pub fn parse(text: &str, source: &str) -> Result<JudgeTemplate> {
        let t: JudgeTemplate = serde_json::from_str(text).with_context(|| format!("judge template {source}"))?;
        for (field, text, names) in [
            ("pairwise", &t.pairwise, &["question", "answer_a", "answer_b"][..]),
            ("grade", &t.grade, &["question", "reference", "answer"][..]),
        ] {
            for n in names {
                ensure!(text.contains(&format!("{{{n}}}")), "judge template {source}: `{field}` has no {{{n}}} placeholder");
            }
        }
        Ok(t)
    }

    /// The template at `path`, or the built-in one.
    pub fn load(path: Option<&Path>) -> Result<(JudgeTemplate, String)> {
        match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).with_context(|| format!("reading judge template {}", p.display()))?;
                Ok((JudgeTemplate::parse(&text, &p.display().to_string())?, p.display().to_string()))
            }
            None => Ok((JudgeTemplate::parse(DEFAULT_TEMPLATE, "pipelines/templates/judge.json")?, "pipelines/templates/judge.json (built in)".into())),
        }
    }

    pub fn pairwise_prompt(&self, question: &str, first: &str, second: &str) -> String {
        fill(&self.pairwise, &[("question", question), ("answer_a", first), ("answer_b", second)])
    }

    pub fn grade_prompt(&self, question: &str, reference: &str, answer: &str) -> String {
        fill(&self.grade, &[("question", question), ("reference", reference), ("answer", answer)])
    }
}

/// `{name}` placeholders replaced in one pass: text inside a filled-in answer is never
/// substituted again (an answer may well contain "{answer_b}").
pub fn fill(template: &str, values: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    'scan: while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        for (name, value) in values {
            if let Some(tail) = after.strip_prefix(name).and_then(|t| t.strip_prefix('}')) {
                out.push_str(value);
                rest = tail;
                continue 'scan;
            }
        }
        out.push('{');
        rest = after;
    }
    out.push_str(rest);
    out
}

/// The judge model: in this process, or behind a server.
pub enum JudgeModel {
    Local(LocalTeacher),
    Served(ServedTeacher),
}

impl JudgeModel {
    pub fn local(spec: &str, device: Device, kind: Kind) -> Result<JudgeModel> {
        let (m, f, t) = crate::model::load(spec, device, kind).with_context(|| format!("--judge {spec}"))?;
        Ok(JudgeModel::Local(LocalTeacher::new(m, f, t)?))
    }

    pub fn name(&self) -> String {
        match self {
            JudgeModel::Local(t) => t.files.name.clone(),
            JudgeModel::Served(t) => format!("{} (served)", t.name()),
        }
    }

    pub fn files(&self) -> &ModelFiles {
        match self {
            JudgeModel::Local(t) => &t.files,
            JudgeModel::Served(t) => &t.files,
        }
    }

    pub fn tok(&self) -> &Tok {
        match self {
            JudgeModel::Local(t) => &t.tok,
            JudgeModel::Served(t) => &t.tok,
        }
    }

    fn eos(&self) -> Vec<i64> {
        match self {
            JudgeModel::Local(t) => t.special.eos.clone(),
            JudgeModel::Served(t) => t.special.eos.clone(),
        }
    }
}

/// The tokens a set of labels is read at.
pub struct Labels {
    /// Each label's first token after `forced`.
    pub ids: Vec<i64>,
    /// Where the labels' first tokens coincide (a tokenizer that writes " A" as a space and
    /// "A"): each label's whole token sequence, read by its total log-probability (a local
    /// judge only). `None`: the first tokens differ and are read alone.
    pub whole: Option<Vec<Vec<i64>>>,
    /// The start of the judge's reply written for it: the reply prefix's tokens and those
    /// every label begins with.
    pub forced: Vec<i64>,
}

/// A judge ready to ask: the model, its rendered template and the label tokens.
pub struct Judge {
    pub model: JudgeModel,
    pub template: JudgeTemplate,
    /// Where the template came from (recorded in every result).
    pub template_source: String,
    chat: String,
    /// Tokens of the judge's reply kept for audit (the verdict never depends on them).
    pub raw_tokens: usize,
    pub batch: usize,
}

/// One reading of the judge: the log-probability of each label's first token as the reply's
/// first token, the label read, and the start of the reply it writes (for audit).
#[derive(Clone, Debug)]
pub struct Reading {
    pub logprobs: Vec<f64>,
    /// Index of the label read (the most likely; an exact tie between labels reads as the
    /// last of them, which is "tie" or "wrong" in the built-in order).
    pub pick: usize,
    pub raw: String,
    /// Length of the judge's prompt in its tokens.
    pub prompt_tokens: usize,
}

impl Judge {
    pub fn new(model: JudgeModel, template: JudgeTemplate, template_source: String, raw_tokens: usize, batch: usize) -> Result<Judge> {
        let chat = chat_template(model.files())?
            .with_context(|| format!("judge `{}` has no chat template: a judge must be an instruction-tuned model", model.name()))?;
        let j = Judge { model, template, template_source, chat, raw_tokens, batch: batch.max(1) };
        let p = &j.template.pairwise_labels;
        j.label_tokens(&[&p.a, &p.b, &p.tie], j.template.pairwise_reply.as_deref())?;
        let g = &j.template.grade_labels;
        j.label_tokens(&[&g.correct, &g.partial, &g.wrong], j.template.grade_reply.as_deref())?;
        Ok(j)
    }

    /// How the labels are read after `reply` (and a space), or as the start of the reply:
    /// the tokens all labels begin with are written for the judge (`forced`, e.g. a lone
    /// space token where a tokenizer has no " A"), and each label is read at its first token
    /// after them, which must differ between the labels of a set.
    pub fn label_tokens(&self, labels: &[&str], reply: Option<&str>) -> Result<Labels> {
        let tok = self.model.tok();
        let reply = reply.filter(|r| !r.is_empty());
        let start = reply.map(|r| tok.encode(r, false)).transpose()?.unwrap_or_default();
        let mut seqs = vec![];
        for l in labels {
            seqs.push(match reply {
                Some(r) => {
                    let joined = tok.encode(&format!("{r} {l}"), false)?;
                    ensure!(
                        joined.starts_with(&start),
                        "judge template {}: the judge's tokenizer merges the end of the reply {r:?} with the label {l:?}; end the reply differently",
                        self.template_source
                    );
                    joined[start.len()..].to_vec()
                }
                None => tok.encode(l, false)?,
            });
        }
        let common = (0..).take_while(|&i| seqs.iter().all(|s| s.len() > i && s[i] == seqs[0][i])).count();
        for (l, s) in labels.iter().zip(&seqs) {
            ensure!(s.len() > common, "judge template {}: the label {l:?} is the start of another label; the verdict could not tell them apart", self.template_source);
        }
        let tails: Vec<Vec<i64>> = seqs.iter().map(|s| s[common..].to_vec()).collect();
        let ids: Vec<i64> = tails.iter().map(|t| t[0]).collect();
        let distinct = (0..ids.len()).all(|i| !ids[..i].contains(&ids[i]));
        let whole = if distinct {
            None
        } else {
            ensure!(
                matches!(self.model, JudgeModel::Local(_)),
                "judge template {}: the labels {labels:?} begin with the same token of the judge's tokenizer, and a served judge is read \
                 at its first token only; choose labels that begin differently",
                self.template_source
            );
            for i in 0..tails.len() {
                if let Some(j) = tails[..i].iter().position(|t| *t == tails[i]) {
                    bail!(
                        "judge template {}: the labels {:?} and {:?} are the same tokens; the verdict could not tell them apart",
                        self.template_source,
                        labels[j],
                        labels[i]
                    );
                }
            }
            Some(tails)
        };
        let forced = start.into_iter().chain(seqs[0][..common].iter().copied()).collect();
        Ok(Labels { ids, whole, forced })
    }

    /// The judge's prompt ids: the system turn, then `text` as the user turn, then the
    /// generation prompt, rendered through the judge's chat template, then the start of the
    /// reply written for the judge (`labels.forced`).
    pub fn prompt_ids(&self, text: &str, labels: &Labels) -> Result<Vec<i64>> {
        let mut turns = vec![];
        if let Some(s) = self.template.system.as_deref().filter(|s| !s.is_empty()) {
            turns.push(("system", s));
        }
        turns.push(("user", text));
        let mut ids = self.model.tok().encode(&render_chat(self.model.files(), &self.chat, &turns)?, false)?;
        ids.extend(&labels.forced);
        Ok(ids)
    }

    /// Reads the judge on each prompt for the labels `labels` (first tokens).
    pub fn read(&self, prompts: &[Vec<i64>], set: &Labels) -> Result<Vec<Reading>> {
        let labels = &set.ids;
        let n = prompts.len();
        let mut logprobs = vec![vec![]; n];
        let mut raw_ids: Vec<Vec<i64>> = vec![vec![]; n];
        let greedy = |max_new_tokens: usize| Sampling {
            max_new_tokens,
            temperature: 0.0,
            top_k: None,
            top_p: None,
            eos: self.model.eos(),
            pad: 0,
            stop: vec![],
        };
        match &self.model {
            JudgeModel::Local(t) => {
                // Exact: the full fp32 distributions (one row per query, or a label's rows).
                let seqs: Vec<Vec<i64>> = match &set.whole {
                    None => prompts.iter().map(|p| p.iter().copied().chain([labels[0]]).collect()).collect(),
                    Some(tails) => prompts.iter().flat_map(|p| tails.iter().map(move |t| p.iter().chain(t).copied().collect())).collect(),
                };
                let per = if set.whole.is_some() { labels.len() } else { 1 };
                let queries: Vec<Query> = seqs.iter().enumerate().map(|(i, s)| Query { record: i, ids: s, from: prompts[i / per].len() }).collect();
                let targets = tch::Tensor::from_slice(labels);
                let mut sums = vec![0.0f64; seqs.len()];
                t.predict(&queries, self.batch, &mut |i, off, pred| {
                    let Predictions::Dense(lp) = pred else { bail!("a local judge gives full distributions") };
                    match &set.whole {
                        None => {
                            let row = lp.get(0).index_select(0, &targets.to_device(lp.device())).to_kind(Kind::Double).to_device(Device::Cpu);
                            logprobs[i] = Vec::<f64>::try_from(&row)?;
                        }
                        Some(tails) => {
                            let t = &tails[i % per][off as usize..off as usize + lp.size()[0] as usize];
                            let picked = lp.gather(1, &tch::Tensor::from_slice(t).to_device(lp.device()).unsqueeze(1), false);
                            sums[i] += picked.to_kind(Kind::Double).sum(Kind::Double).double_value(&[]);
                        }
                    }
                    Ok(())
                })?;
                if set.whole.is_some() {
                    for (i, lp) in logprobs.iter_mut().enumerate() {
                        *lp = sums[i * per..(i + 1) * per].to_vec();
                    }
                }
                if self.raw_tokens > 0 {
                    for (start, chunk) in prompts.chunks(self.batch).enumerate() {
                        let mut rngs = vec![SplitMix64::new(0); chunk.len()];
                        let outs = t.generate(chunk, &greedy(self.raw_tokens), &mut rngs, &|_| false)?;
                        for (j, o) in outs.into_iter().enumerate() {
                            raw_ids[start * self.batch + j] = o;
                        }
                    }
                }
            }
            JudgeModel::Served(t) => {
                // The server's top-K at the reply's first token. A label outside it is less
                // likely than every token in it, but its own value is unknown: it reads as
                // -inf (null in the sidecar), so a label the server returned always wins
                // over one it did not, and none returned reads as the last label (a tie).
                let mut rngs = vec![SplitMix64::new(0); n];
                let k = t.caps.top_k_checked.unwrap_or(20) as i64;
                let (outs, rows) = t.generate_top(prompts, &greedy(self.raw_tokens.max(1)), &mut rngs, &|_| false, Some(k), self.batch)?;
                let rows = rows.context("the judge's server returned no log-probabilities")?;
                for (i, r) in rows.iter().enumerate() {
                    ensure!(r.rows() > 0, "the judge's server returned an empty reply for judge prompt {i}");
                    let idx = Vec::<i64>::try_from(&r.indices.get(0).to_kind(Kind::Int64))?;
                    let lp = Vec::<f64>::try_from(&r.logprobs.get(0).to_kind(Kind::Double))?;
                    logprobs[i] = labels.iter().map(|l| idx.iter().position(|x| x == l).map_or(f64::NEG_INFINITY, |p| lp[p])).collect();
                }
                if self.raw_tokens > 0 {
                    raw_ids = outs;
                }
            }
        }
        let mut out = vec![];
        for ((lp, ids), p) in logprobs.into_iter().zip(raw_ids).zip(prompts) {
            ensure!(lp.len() == labels.len(), "the judge returned no reading for a prompt");
            let best = lp.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let pick = lp.iter().rposition(|&x| x == best).unwrap_or(labels.len() - 1);
            out.push(Reading { raw: self.model.tok().decode(&ids, true)?, logprobs: lp, pick, prompt_tokens: p.len() });
        }
        Ok(out)
    }
}

/// Who won one comparison, in terms of the models (not of the positions shown).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Winner {
    A,
    B,
    Tie,
}

impl Winner {
    pub fn name(self) -> &'static str {
        match self {
            Winner::A => "a",
            Winner::B => "b",
            Winner::Tie => "tie",
        }
    }

    /// The label read (0: first shown, 1: second shown, 2: tie), mapped to the models when
    /// model A was shown first (`a_first`) or second.
    pub fn from_pick(pick: usize, a_first: bool) -> Winner {
        match (pick, a_first) {
            (0, true) | (1, false) => Winner::A,
            (1, true) | (0, false) => Winner::B,
            _ => Winner::Tie,
        }
    }

    /// Both orders' verdicts combined: the same winner twice wins; otherwise a tie.
    pub fn combine(first: Winner, second: Winner) -> Winner {
        if first == second {
            first
        } else {
            Winner::Tie
        }
    }
}

/// One prompt and the two answers to compare.
pub struct PairItem {
    pub id: String,
    pub question: String,
    pub answer_a: String,
    pub answer_b: String,
}

/// Asks the judge about every pair in both orders; returns the summary and the per-item
/// record (each order's label log-probabilities, verdict and raw reply).
pub fn pairwise(judge: &Judge, items: &[PairItem], names: [&str; 2], bootstrap: usize) -> Result<(Value, Vec<Value>)> {
    ensure!(!items.is_empty(), "no prompts to judge");
    let l = &judge.template.pairwise_labels;
    let reply = judge.template.pairwise_reply.as_deref();
    let labels = judge.label_tokens(&[&l.a, &l.b, &l.tie], reply)?;
    let mut prompts = vec![];
    for it in items {
        prompts.push(judge.prompt_ids(&judge.template.pairwise_prompt(&it.question, &it.answer_a, &it.answer_b), &labels)?);
        prompts.push(judge.prompt_ids(&judge.template.pairwise_prompt(&it.question, &it.answer_b, &it.answer_a), &labels)?);
    }
    let readings = judge.read(&prompts, &labels)?;
    let (mut wins, mut consistent, mut first_picked) = ([0usize; 3], 0usize, 0usize);
    // A served judge's top-K may hold no label at all: that reading defaults to a tie.
    let unread = readings.iter().filter(|r| r.logprobs.iter().all(|x| !x.is_finite())).count();
    let mut scores = vec![];
    let mut rows = vec![];
    for (it, pair) in items.iter().zip(readings.chunks(2)) {
        let (w1, w2) = (Winner::from_pick(pair[0].pick, true), Winner::from_pick(pair[1].pick, false));
        let w = Winner::combine(w1, w2);
        consistent += usize::from(w1 == w2);
        first_picked += pair.iter().filter(|r| r.pick == 0).count();
        wins[w as usize] += 1;
        scores.push(match w {
            Winner::A => 1.0,
            Winner::B => 0.0,
            Winner::Tie => 0.5,
        });
        let order = |r: &Reading, first: &str, w: Winner| {
            let label = [&l.a, &l.b, &l.tie][r.pick];
            json!({"shown_first": first, "logprobs": {&l.a: r.logprobs[0], &l.b: r.logprobs[1], &l.tie: r.logprobs[2]},
                   "label": label, "winner": w.name(), "raw": r.raw, "prompt_tokens": r.prompt_tokens})
        };
        rows.push(json!({
            "id": it.id, "prompt": it.question, "answer_a": it.answer_a, "answer_b": it.answer_b,
            "orders": [order(&pair[0], "a", w1), order(&pair[1], "b", w2)],
            "winner": w.name(), "consistent": w1 == w2,
        }));
    }
    let n = items.len();
    let rate = |k: usize| k as f64 / n as f64;
    let summary = json!({
        "kind": "pairwise",
        "judge": judge.model.name(),
        "template": judge.template_source,
        "verdict_from": "log-probabilities of each label's first token as the judge's first reply token; both orders asked, disagreements are ties",
        "a": names[0], "b": names[1], "items": n,
        "wins_a": wins[Winner::A as usize], "wins_b": wins[Winner::B as usize], "ties": wins[Winner::Tie as usize],
        "win_rate_a": rate(wins[Winner::A as usize]), "win_rate_a_ci95": wilson_interval(wins[Winner::A as usize], n),
        "win_rate_b": rate(wins[Winner::B as usize]), "win_rate_b_ci95": wilson_interval(wins[Winner::B as usize], n),
        "tie_rate": rate(wins[Winner::Tie as usize]), "tie_rate_ci95": wilson_interval(wins[Winner::Tie as usize], n),
        // A win counts 1, a tie one half: 0.5 is "no preference".
        "score_a": scores.iter().sum::<f64>() / n as f64,
        "score_a_ci95": bootstrap_mean_ci(&scores, bootstrap, BOOTSTRAP_SEED),
        "self_agreement": rate(consistent), "self_agreement_ci95": wilson_interval(consistent, n),
        "first_position_rate": first_picked as f64 / (2 * n) as f64, "first_position_rate_ci95": wilson_interval(first_picked, 2 * n),
        "readings_without_labels": unread,
    });
    Ok((summary, rows))
}

/// A reference grade's label (in the template's order) and its score.
pub const GRADE_NAMES: [&str; 3] = ["correct", "partial", "wrong"];
pub const GRADE_SCORES: [f64; 3] = [1.0, 0.5, 0.0];

/// Grades each `(question, reference, answer)`; returns the readings (label index = grade).
pub fn grade(judge: &Judge, items: &[(&str, &str, &str)]) -> Result<Vec<Reading>> {
    let g = &judge.template.grade_labels;
    let reply = judge.template.grade_reply.as_deref();
    let labels = judge.label_tokens(&[&g.correct, &g.partial, &g.wrong], reply)?;
    let prompts: Vec<Vec<i64>> =
        items.iter().map(|(q, r, a)| judge.prompt_ids(&judge.template.grade_prompt(q, r, a), &labels)).collect::<Result<_>>()?;
    judge.read(&prompts, &labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_substitutes_once() {
        let t = "Q: {question} A: {answer_a} B: {answer_b} {other}";
        assert_eq!(fill(t, &[("question", "{answer_b}?"), ("answer_a", "x"), ("answer_b", "y")]), "Q: {answer_b}? A: x B: y {other}");
    }

    #[test]
    fn the_built_in_template_parses_and_a_missing_placeholder_is_named() {
        JudgeTemplate::load(None).unwrap();
        let bad = DEFAULT_TEMPLATE.replace("{answer_b}", "the other answer");
        let e = JudgeTemplate::parse(&bad, "t.json").unwrap_err().to_string();
        assert!(e.contains("{answer_b}") && e.contains("pairwise"), "{e}");
    }

    #[test]
    fn orders_map_back_to_models_and_disagreement_is_a_tie() {
        assert_eq!(Winner::from_pick(0, true), Winner::A);
        assert_eq!(Winner::from_pick(0, false), Winner::B);
        assert_eq!(Winner::from_pick(1, false), Winner::A);
        assert_eq!(Winner::from_pick(2, false), Winner::Tie);
        assert_eq!(Winner::combine(Winner::A, Winner::A), Winner::A);
        // Position bias: "the first shown" both times is A once and B once: a tie.
        assert_eq!(Winner::combine(Winner::from_pick(0, true), Winner::from_pick(0, false)), Winner::Tie);
        assert_eq!(Winner::combine(Winner::A, Winner::Tie), Winner::Tie);
    }
}
