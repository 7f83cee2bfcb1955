//! What each serving engine is sent and what it answers: request bodies and response
//! parsing for llama.cpp's `llama-server`, vLLM and SGLang, with no networking (the
//! [`super::served`] client does that). Prompts always travel as token ids, so the ids the
//! records carry are the ids the teacher saw.
//!
//! | engine | generation | top-K of generated tokens | teacher-forced scoring |
//! | --- | --- | --- | --- |
//! | llama.cpp | `POST /completion`, `return_tokens` | `n_probs`, ids in `completion_probabilities` | refused: the server answers `echo` with "Only no echo is supported" |
//! | vLLM | `POST /v1/completions`, `return_token_ids` | `logprobs` + `return_tokens_as_token_ids` | `prompt_logprobs` (keys are token ids) |
//! | SGLang | `POST /generate`, `input_ids` | `return_logprob`, `top_logprobs_num` | `logprob_start_len: 0`, `input_top_logprobs` |
//! | llama-cpp-python | refused: answers carry text and token strings, no ids | refused | `echo` + `logprobs` on the decoded text ([`super::echo`]) |
//!
//! Log-probabilities are those of the model's own distribution (temperature 1, before any
//! sampling filter): llama.cpp's default (`post_sampling_probs` false), vLLM's default
//! (`logprobs_mode` raw), SGLang's `output_top_logprobs`.
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    LlamaCpp,
    Vllm,
    Sglang,
    /// llama-cpp-python's server: teacher-forced scoring only ([`super::echo`]).
    LlamaCppPython,
}

/// One generation request: a token prompt and the sampling settings.
#[derive(Clone, Debug)]
pub struct GenRequest<'a> {
    pub prompt: &'a [i64],
    pub max_tokens: usize,
    /// 0 is greedy.
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    /// The row's own seed (31 bits: llama.cpp reads it as uint32 and -1 as "random").
    pub seed: u32,
    /// Top log-probabilities per generated token (0: none).
    pub top_logprobs: usize,
    pub ignore_eos: bool,
    /// Stop strings the server may stop at: it keeps the token that completes one, as the
    /// client's own rule does (llama.cpp pushes the token before its stop search).
    pub stop: &'a [String],
}

/// Top-K of one position: (token id, log-probability), most likely first.
pub type TopRow = Vec<(i64, f64)>;

/// A parsed generation: the ids, the server's text, and with top log-probabilities one row
/// per generated token.
#[derive(Clone, Debug, PartialEq)]
pub struct Generated {
    pub ids: Vec<i64>,
    pub text: String,
    pub top: Option<Vec<TopRow>>,
    /// Positions whose row the server did not return (left empty in `top`).
    pub missing: Vec<usize>,
}

impl Engine {
    pub fn parse(name: &str) -> Result<Option<Engine>> {
        Ok(match name {
            "auto" => None,
            "llamacpp" | "llama.cpp" | "llama-server" => Some(Engine::LlamaCpp),
            "vllm" => Some(Engine::Vllm),
            "sglang" => Some(Engine::Sglang),
            "llama-cpp-python" | "llama_cpp_python" => Some(Engine::LlamaCppPython),
            _ => bail!("--teacher-engine `{name}`: expected auto, llamacpp, vllm, sglang or llama-cpp-python"),
        })
    }

    /// The engine behind a `/v1/models` answer (`owned_by`).
    pub fn detect(models: &Value) -> Option<Engine> {
        let owner = models["data"][0]["owned_by"].as_str()?.to_ascii_lowercase();
        Some(match owner.as_str() {
            "llamacpp" | "llama.cpp" => Engine::LlamaCpp,
            "vllm" => Engine::Vllm,
            "sglang" => Engine::Sglang,
            // llama_cpp/server/app.py lists its model as owned by "me".
            "me" => Engine::LlamaCppPython,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Engine::LlamaCpp => "llama.cpp",
            Engine::Vllm => "vLLM",
            Engine::Sglang => "SGLang",
            Engine::LlamaCppPython => "llama-cpp-python",
        }
    }

    /// The server setting that raises the number of top log-probabilities it returns.
    pub fn logprobs_flag(self) -> &'static str {
        match self {
            Engine::LlamaCpp => "no llama-server flag limits it (check the request's n_probs)",
            Engine::Vllm => "restart vLLM with --max-logprobs K (default 20)",
            Engine::Sglang => "check SGLang's top_logprobs_num limit for this model",
            Engine::LlamaCppPython => "llama-cpp-python returns log-probabilities only with --logits_all true (its default)",
        }
    }

    pub fn generate_path(self) -> &'static str {
        match self {
            Engine::LlamaCpp => "/completion",
            Engine::Vllm | Engine::LlamaCppPython => "/v1/completions",
            Engine::Sglang => "/generate",
        }
    }

    /// Why this engine cannot generate for the records (which carry ids), if it cannot.
    pub fn cannot_generate(self) -> Option<&'static str> {
        (self == Engine::LlamaCppPython).then_some(
            "llama-cpp-python's server answers with text and token strings, not token ids, so its completions cannot become \
             records; generate with llama.cpp's llama-server, vLLM or SGLang (llama-cpp-python serves teacher-forced scoring: \
             kd-generate --score, kd-filter, kd-eval, kd-distill)",
        )
    }

    pub fn generate_body(self, r: &GenRequest, model: &str) -> Value {
        match self {
            // Every sampler that llama.cpp enables by default and transformers does not
            // (top-k 40, top-p 0.95, min-p 0.05) is set explicitly; prompt caching is off
            // because a reused prefix changes the batch shapes and so the last bits.
            Engine::LlamaCpp => json!({
                "prompt": r.prompt,
                "n_predict": r.max_tokens,
                "temperature": r.temperature,
                "top_k": r.top_k.unwrap_or(0),
                "top_p": r.top_p.unwrap_or(1.0),
                "min_p": 0.0,
                "typical_p": 1.0,
                "repeat_penalty": 1.0,
                "seed": r.seed,
                "n_probs": r.top_logprobs,
                "return_tokens": true,
                "cache_prompt": false,
                "ignore_eos": r.ignore_eos,
                "stop": r.stop,
                "stream": false,
            }),
            Engine::Vllm => {
                let mut b = json!({
                    "model": model,
                    "prompt": r.prompt,
                    "max_tokens": r.max_tokens,
                    "temperature": r.temperature,
                    "top_p": r.top_p.unwrap_or(1.0),
                    "top_k": r.top_k.unwrap_or(-1),
                    "seed": r.seed,
                    "ignore_eos": r.ignore_eos,
                    "skip_special_tokens": false,
                    "return_token_ids": true,
                    "return_tokens_as_token_ids": true,
                    "stop": r.stop,
                    "include_stop_str_in_output": true,
                });
                if r.top_logprobs > 0 {
                    b["logprobs"] = json!(r.top_logprobs);
                }
                b
            }
            Engine::Sglang => json!({
                "input_ids": r.prompt,
                "sampling_params": {
                    "max_new_tokens": r.max_tokens,
                    "temperature": r.temperature,
                    "top_p": r.top_p.unwrap_or(1.0),
                    "top_k": r.top_k.unwrap_or(-1),
                    "sampling_seed": r.seed,
                    "ignore_eos": r.ignore_eos,
                    "skip_special_tokens": false,
                    "stop": r.stop,
                },
                "return_logprob": r.top_logprobs > 0,
                "top_logprobs_num": r.top_logprobs,
                "logprob_start_len": -1,
                "stream": false,
            }),
            Engine::LlamaCppPython => unreachable!("generation through llama-cpp-python is refused before any request"),
        }
    }

    /// Parses a generation answer; with `k > 0` every generated token must come with its
    /// top-`k` (ids, not strings).
    pub fn parse_generated(self, v: &Value, k: usize) -> Result<Generated> {
        let g = match self {
            Engine::LlamaCpp => {
                let ids = int_list(&v["tokens"]).context("the answer has no `tokens` (ids): is this llama.cpp's server?")?;
                let (top, missing) = if k > 0 {
                    // llama.cpp keeps no log-probabilities for a token that leaves the text
                    // inside a UTF-8 character (tools/server: `add_token` runs only when the
                    // text is complete). The entries that exist carry their token's id, so they
                    // are matched to the tokens in order, and the gaps are listed.
                    // With stop strings it leaves out the entries of the tokens it held back
                    // while matching one, the whole key when that is every token.
                    let none = vec![];
                    let probs = match &v["completion_probabilities"] {
                        Value::Null if !ids.is_empty() && v.get("stop_type").and_then(Value::as_str) == Some("word") => &none,
                        p => p.as_array().context("the answer has no `completion_probabilities`")?,
                    };
                    let (mut rows, mut missing, mut j) = (vec![], vec![], 0);
                    for (i, &id) in ids.iter().enumerate() {
                        match probs.get(j) {
                            Some(p) if p["id"].as_i64() == Some(id) => {
                                let top = p["top_logprobs"].as_array().with_context(|| format!("completion_probabilities[{j}] has no `top_logprobs` (is post_sampling_probs on?)"))?;
                                rows.push(top.iter().map(|t| Ok((t["id"].as_i64().context("a top_logprobs entry without `id`")?, t["logprob"].as_f64().context("a top_logprobs entry without `logprob`")?))).collect::<Result<TopRow>>()?);
                                j += 1;
                            }
                            _ => {
                                missing.push(i);
                                rows.push(vec![]);
                            }
                        }
                    }
                    ensure!(
                        j == probs.len() && missing.len() == ids.len() - probs.len(),
                        "the {} `completion_probabilities` do not match the {} tokens in order",
                        probs.len(),
                        ids.len()
                    );
                    (Some(rows), missing)
                } else {
                    (None, vec![])
                };
                Generated { ids, text: v["content"].as_str().unwrap_or_default().to_string(), top, missing }
            }
            Engine::Vllm => {
                let c = &v["choices"][0];
                ensure!(c.is_object(), "the answer has no `choices[0]`");
                let lp = &c["logprobs"];
                let ids = match int_list(&c["token_ids"]) {
                    Some(ids) => ids,
                    None => lp["tokens"]
                        .as_array()
                        .context("the answer has neither `token_ids` nor logprobs `tokens`: vLLM before 0.10.2 returns ids only with --store-logits")?
                        .iter()
                        .map(token_id_string)
                        .collect::<Result<_>>()?,
                };
                let top = if k > 0 {
                    let tops = lp["top_logprobs"].as_array().context("the answer has no logprobs `top_logprobs`")?;
                    ensure!(tops.len() == ids.len(), "{} tokens but {} `top_logprobs` rows", ids.len(), tops.len());
                    Some(tops.iter().map(|m| vllm_top_row(m, k)).collect::<Result<_>>()?)
                } else {
                    None
                };
                Generated { ids, text: c["text"].as_str().unwrap_or_default().to_string(), top, missing: vec![] }
            }
            Engine::Sglang => {
                let meta = &v["meta_info"];
                let ids = match int_list(&v["output_ids"]) {
                    Some(ids) => ids,
                    None => meta["output_token_logprobs"]
                        .as_array()
                        .context("the answer has neither `output_ids` nor `meta_info.output_token_logprobs`")?
                        .iter()
                        .map(|t| t[1].as_i64().context("an output_token_logprobs entry without an id"))
                        .collect::<Result<_>>()?,
                };
                let top = if k > 0 {
                    let tops = meta["output_top_logprobs"].as_array().context("the answer has no `meta_info.output_top_logprobs`")?;
                    ensure!(tops.len() == ids.len(), "{} tokens but {} `output_top_logprobs` rows", ids.len(), tops.len());
                    Some(tops.iter().map(sglang_top_row).collect::<Result<_>>()?)
                } else {
                    None
                };
                Generated { ids, text: v["text"].as_str().unwrap_or_default().to_string(), top, missing: vec![] }
            }
            Engine::LlamaCppPython => bail!("{}", Engine::LlamaCppPython.cannot_generate().unwrap_or_default()),
        };
        if let Some(top) = &g.top {
            for (i, row) in top.iter().enumerate().filter(|(i, _)| !g.missing.contains(i)) {
                ensure!(row.len() >= k, "token {i}: the server returned {} top log-probabilities, {k} were asked for", row.len());
            }
        }
        Ok(g)
    }

    /// Teacher-forced scoring of `ids`: the request that returns the top-`k` at every
    /// position of the prompt. llama.cpp's server cannot.
    pub fn score_body(self, ids: &[i64], k: usize, model: &str) -> Result<Value> {
        Ok(match self {
            Engine::LlamaCpp => bail!(
                "llama.cpp's server cannot score given text: it refuses `echo` (\"Only no echo is supported\") and returns \
                 no prompt log-probabilities. Serve the teacher with vLLM (prompt_logprobs) or SGLang, or give a local --teacher"
            ),
            Engine::Vllm => json!({
                "model": model,
                "prompt": ids,
                "max_tokens": 1,
                "temperature": 0.0,
                "prompt_logprobs": k,
                "return_token_ids": true,
            }),
            Engine::Sglang => json!({
                "input_ids": ids,
                "sampling_params": {"max_new_tokens": 0, "temperature": 0.0},
                "return_logprob": true,
                "logprob_start_len": 0,
                "top_logprobs_num": k,
                "stream": false,
            }),
            Engine::LlamaCppPython => bail!("llama-cpp-python scores decoded text (teacher::echo), not ids"),
        })
    }

    /// The top-`k` rows predicting `ids[from..]` (`from` >= 1) from a scoring answer.
    pub fn parse_scored(self, v: &Value, ids: &[i64], from: usize, k: usize) -> Result<Vec<TopRow>> {
        ensure!(from >= 1 && from <= ids.len(), "scoring from token {from} of {}", ids.len());
        let rows: Vec<&Value> = match self {
            Engine::LlamaCpp => bail!("llama.cpp's server cannot score given text"),
            Engine::LlamaCppPython => bail!("llama-cpp-python's answers are read by teacher::echo"),
            Engine::Vllm => {
                let p = v["choices"][0]["prompt_logprobs"].as_array().context("the answer has no `choices[0].prompt_logprobs`")?;
                ensure!(p.len() == ids.len(), "prompt_logprobs has {} positions, the prompt {} tokens", p.len(), ids.len());
                p[from..].iter().collect()
            }
            Engine::Sglang => {
                let p = v["meta_info"]["input_top_logprobs"].as_array().context("the answer has no `meta_info.input_top_logprobs`")?;
                ensure!(p.len() == ids.len(), "input_top_logprobs has {} positions, the prompt {} tokens", p.len(), ids.len());
                p[from..].iter().collect()
            }
        };
        let mut out = vec![];
        for (i, r) in rows.into_iter().enumerate() {
            let row = match self {
                Engine::Vllm => vllm_prompt_row(r, k)?,
                _ => sglang_top_row(r)?,
            };
            ensure!(row.len() >= k, "position {}: {} top log-probabilities, {k} asked for", from + i, row.len());
            out.push(row);
        }
        Ok(out)
    }

    /// The request that tokenizes `text` without special tokens (llama-cpp-python adds the
    /// model's BOS, if it has one, whatever it is asked), and the ids in its answer.
    pub fn tokenize_request(self, text: &str, model: &str) -> (&'static str, Value) {
        match self {
            Engine::LlamaCpp => ("/tokenize", json!({"content": text, "add_special": false})),
            Engine::Vllm | Engine::Sglang => ("/tokenize", json!({"model": model, "prompt": text, "add_special_tokens": false})),
            Engine::LlamaCppPython => ("/extras/tokenize", json!({"model": model, "input": text})),
        }
    }

    /// The token log-probability of each target in a vLLM or SGLang scoring answer (the
    /// target is listed with its rank when outside the top-K).
    pub fn parse_scored_targets(self, v: &Value, ids: &[i64], from: usize) -> Result<Vec<f64>> {
        match self {
            Engine::Vllm => {
                let p = v["choices"][0]["prompt_logprobs"].as_array().context("the answer has no `choices[0].prompt_logprobs`")?;
                ensure!(p.len() == ids.len(), "prompt_logprobs has {} positions, the prompt {} tokens", p.len(), ids.len());
                (from..ids.len())
                    .map(|t| p[t][ids[t].to_string()]["logprob"].as_f64().with_context(|| format!("prompt_logprobs[{t}] does not list token {}", ids[t])))
                    .collect()
            }
            Engine::Sglang => {
                let p = v["meta_info"]["input_token_logprobs"].as_array().context("the answer has no `meta_info.input_token_logprobs`")?;
                ensure!(p.len() == ids.len(), "input_token_logprobs has {} positions, the prompt {} tokens", p.len(), ids.len());
                (from..ids.len()).map(|t| p[t][0].as_f64().with_context(|| format!("input_token_logprobs[{t}] has no log-probability"))).collect()
            }
            _ => bail!("{} answers carry no target log-probabilities", self.name()),
        }
    }

    /// The requests that turn chat `messages` into the prompt ids the server's own
    /// `/v1/chat/completions` generates from: its chat template (with the generation prompt)
    /// and its tokenisation of the result. llama.cpp: `/apply-template`, then `/tokenize` with
    /// special tokens added and parsed, as its chat handler tokenises; vLLM: `/tokenize` with
    /// `messages` (one request). SGLang has no such endpoint.
    pub fn chat_render(self, messages: &Value, model: &str) -> Result<(&'static str, Value)> {
        Ok(match self {
            Engine::LlamaCpp => ("/apply-template", json!({"messages": messages})),
            Engine::Vllm => ("/tokenize", json!({"model": model, "messages": messages, "add_generation_prompt": true})),
            Engine::Sglang | Engine::LlamaCppPython => bail!(
                "{} has no endpoint that renders its chat template into token ids; render prompts locally with --chat-template \
                 (--teacher-tokenizer must carry the served model's chat template)",
                self.name()
            ),
        })
    }

    /// llama.cpp's `/tokenize` request for a prompt its `/apply-template` rendered.
    pub fn llamacpp_chat_tokenize_body(prompt: &str) -> Value {
        json!({"content": prompt, "add_special": true, "parse_special": true})
    }

    pub fn parse_tokens(v: &Value) -> Result<Vec<i64>> {
        int_list(&v["tokens"]).context("the /tokenize answer has no `tokens` list of ids")
    }
}

/// The request that returns the top-`k` at the position after `prefix` (llama.cpp only):
/// one forced single-byte token (`filler`, by logit bias, which acts after the
/// log-probabilities are taken) so that the server keeps its entry.
pub fn llamacpp_position_body(prefix: &[i64], k: usize, filler: i64) -> Value {
    json!({
        "prompt": prefix,
        "n_predict": 1,
        "temperature": 0.0,
        "n_probs": k,
        "logit_bias": [[filler, 1000.0]],
        "return_tokens": true,
        "cache_prompt": false,
    })
}

fn int_list(v: &Value) -> Option<Vec<i64>> {
    v.as_array()?.iter().map(Value::as_i64).collect()
}

/// vLLM's `return_tokens_as_token_ids` form, `token_id:123`.
fn token_id_string(t: &Value) -> Result<i64> {
    let s = t.as_str().context("a logprobs token is not a string")?;
    s.strip_prefix("token_id:")
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("logprobs token `{s}` is not `token_id:N`: the server ignored return_tokens_as_token_ids"))
}

fn sorted(mut row: TopRow) -> TopRow {
    row.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    row
}

/// A vLLM `top_logprobs` map (`{"token_id:N": logprob}`; the sampled token may be added as a
/// K+1-th entry), its `k` best.
fn vllm_top_row(m: &Value, k: usize) -> Result<TopRow> {
    let m = m.as_object().context("a top_logprobs row is not an object")?;
    let row = m.iter().map(|(t, lp)| Ok((token_id_string(&json!(t))?, lp.as_f64().context("a top logprob is not a number")?))).collect::<Result<TopRow>>()?;
    Ok(sorted(row).into_iter().take(k).collect())
}

/// A vLLM `prompt_logprobs` position (`{"123": {"logprob": .., "rank": .., "decoded_token": ..}}`,
/// the actual token added when outside the top-K), its `k` best.
fn vllm_prompt_row(m: &Value, k: usize) -> Result<TopRow> {
    let m = m.as_object().context("a prompt_logprobs position is not an object")?;
    let row = m
        .iter()
        .map(|(t, e)| {
            let id = t.parse::<i64>().with_context(|| format!("prompt_logprobs key `{t}` is not a token id"))?;
            Ok((id, e["logprob"].as_f64().context("a prompt_logprobs entry without `logprob`")?))
        })
        .collect::<Result<TopRow>>()?;
    Ok(sorted(row).into_iter().take(k).collect())
}

/// An SGLang top-logprobs position: `[[logprob, id, text-or-null], ...]`.
fn sglang_top_row(r: &Value) -> Result<TopRow> {
    let r = r.as_array().context("a top-logprobs position is not a list")?;
    let row = r
        .iter()
        .map(|e| Ok((e[1].as_i64().context("a top-logprobs entry without an id")?, e[0].as_f64().context("a top-logprobs entry without a logprob")?)))
        .collect::<Result<TopRow>>()?;
    Ok(sorted(row))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llama.cpp's `/completion` answer (tools/server/README.md, `n_probs` and
    /// `return_tokens`; fields trimmed).
    const LLAMACPP: &str = r#"{"index":0,"content":" Paris.","tokens":[6342,13],"id_slot":0,"stop":true,
        "model":"gpt-3.5-turbo","tokens_predicted":2,"tokens_evaluated":6,"stop_type":"limit",
        "completion_probabilities":[
          {"id":6342,"token":" Paris","bytes":[32,80,97,114,105,115],"logprob":-0.1,
           "top_logprobs":[{"id":6342,"token":" Paris","bytes":[32,80,97,114,105,115],"logprob":-0.1},
                           {"id":264,"token":" a","bytes":[32,97],"logprob":-2.5}]},
          {"id":13,"token":".","bytes":[46],"logprob":-0.7,
           "top_logprobs":[{"id":11,"token":",","bytes":[44],"logprob":-0.6},
                           {"id":13,"token":".","bytes":[46],"logprob":-0.7}]}]}"#;

    /// vLLM's `/v1/completions` answer with `logprobs: 2`, `return_tokens_as_token_ids` and
    /// `return_token_ids` (vllm/entrypoints/openai/protocol.py CompletionResponse; the
    /// sampled token appears as a third top entry when outside the top 2).
    const VLLM: &str = r#"{"id":"cmpl-1","object":"text_completion","created":1,"model":"m",
        "choices":[{"index":0,"text":" Paris.","token_ids":[6342,13],
          "logprobs":{"text_offset":[0,6],"token_logprobs":[-0.1,-0.7],
            "tokens":["token_id:6342","token_id:13"],
            "top_logprobs":[{"token_id:6342":-0.1,"token_id:264":-2.5},
                            {"token_id:11":-0.6,"token_id:13":-0.7,"token_id:7":-0.9}]},
          "finish_reason":"length","stop_reason":null,"prompt_logprobs":null}],
        "usage":{"prompt_tokens":6,"total_tokens":8,"completion_tokens":2}}"#;

    /// vLLM's `prompt_logprobs: 2` answer (the first position is null; the actual token
    /// appears with its rank when outside the top 2).
    const VLLM_SCORE: &str = r#"{"choices":[{"index":0,"text":"x","prompt_logprobs":[null,
        {"264":{"logprob":-1.0,"rank":1,"decoded_token":" a"},"5":{"logprob":-1.5,"rank":2,"decoded_token":"b"}},
        {"9":{"logprob":-4.0,"rank":7,"decoded_token":"c"},"11":{"logprob":-0.2,"rank":1,"decoded_token":","},"13":{"logprob":-2.0,"rank":2,"decoded_token":"."}}],
        "finish_reason":"length"}]}"#;

    /// SGLang's `/generate` answer with `return_logprob`, `top_logprobs_num: 2`,
    /// `logprob_start_len: 0` (docs/backend/native_api: `[logprob, id, text]` triples).
    const SGLANG: &str = r#"{"text":" Paris.","output_ids":[6342,13],"meta_info":{"id":"r","finish_reason":{"type":"length","length":2},
        "prompt_tokens":3,"completion_tokens":2,
        "input_token_logprobs":[[null,1,null],[-1.0,264,null],[-2.0,13,null]],
        "input_top_logprobs":[null,[[-1.0,264,null],[-1.5,5,null]],[[-0.2,11,null],[-2.0,13,null]]],
        "output_token_logprobs":[[-0.1,6342,null],[-0.7,13,null]],
        "output_top_logprobs":[[[-0.1,6342,null],[-2.5,264,null]],[[-0.6,11,null],[-0.7,13,null]]]}}"#;

    fn v(s: &str) -> Value {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn every_engine_s_generation_answer_gives_the_same_ids_and_top_k() {
        let want_top = vec![vec![(6342, -0.1), (264, -2.5)], vec![(11, -0.6), (13, -0.7)]];
        for (e, body) in [(Engine::LlamaCpp, LLAMACPP), (Engine::Vllm, VLLM), (Engine::Sglang, SGLANG)] {
            let g = e.parse_generated(&v(body), 2).unwrap();
            assert_eq!(g.ids, [6342, 13], "{e:?}");
            assert_eq!(g.text, " Paris.", "{e:?}");
            assert_eq!(g.top.as_ref().unwrap(), &want_top, "{e:?}");
            assert!(e.parse_generated(&v(body), 0).unwrap().top.is_none());
            // More than the server returned is an error naming the count.
            let err = e.parse_generated(&v(body), 3).unwrap_err().to_string();
            assert!(err.contains("2 top log-probabilities, 3 were asked"), "{e:?}: {err}");
        }
    }

    #[test]
    fn llamacpp_gaps_at_split_utf8_characters_are_listed() {
        // Token 195 (the first byte of `é`) left the text incomplete: no entry for it.
        let body = r#"{"content":"é!","tokens":[195,169,0],"completion_probabilities":[
            {"id":169,"logprob":-0.5,"top_logprobs":[{"id":169,"logprob":-0.5}]},
            {"id":0,"logprob":-0.1,"top_logprobs":[{"id":0,"logprob":-0.1}]}]}"#;
        let g = Engine::LlamaCpp.parse_generated(&v(body), 1).unwrap();
        assert_eq!(g.missing, [0]);
        assert_eq!(g.top.unwrap(), vec![vec![], vec![(169, -0.5)], vec![(0, -0.1)]]);
        // Entries that match no token in order are refused.
        let bad = body.replace(r#""id":0,"logprob":-0.1,"top"#, r#""id":7,"logprob":-0.1,"top"#);
        assert!(Engine::LlamaCpp.parse_generated(&v(&bad), 1).unwrap_err().to_string().contains("do not match"));
    }

    #[test]
    fn vllm_and_sglang_scoring_answers_give_the_rows_after_the_prompt() {
        let ids = [1, 264, 13];
        let want = vec![vec![(264, -1.0), (5, -1.5)], vec![(11, -0.2), (13, -2.0)]];
        assert_eq!(Engine::Vllm.parse_scored(&v(VLLM_SCORE), &ids, 1, 2).unwrap(), want);
        assert_eq!(Engine::Sglang.parse_scored(&v(SGLANG), &ids, 1, 2).unwrap(), want);
        assert_eq!(Engine::Vllm.parse_scored(&v(VLLM_SCORE), &ids, 2, 2).unwrap(), want[1..]);
        // Each target's own log-probability (token 9 of VLLM_SCORE's third position is not the target).
        assert_eq!(Engine::Vllm.parse_scored_targets(&v(VLLM_SCORE), &ids, 1).unwrap(), [-1.0, -2.0]);
        assert_eq!(Engine::Sglang.parse_scored_targets(&v(SGLANG), &ids, 1).unwrap(), [-1.0, -2.0]);
        assert_eq!(Engine::Sglang.parse_scored_targets(&v(SGLANG), &ids, 2).unwrap(), [-2.0]);
        // A prompt of another length is caught, not misaligned.
        assert!(Engine::Vllm.parse_scored(&v(VLLM_SCORE), &ids[..2], 1, 2).unwrap_err().to_string().contains("3 positions"));
    }

    #[test]
    fn llamacpp_scoring_is_refused_with_the_reason() {
        let err = Engine::LlamaCpp.score_body(&[1, 2], 2, "m").unwrap_err().to_string();
        assert!(err.contains("Only no echo is supported") && err.contains("vLLM"), "{err}");
        // llama-cpp-python scores but cannot generate records: said before any request.
        assert!(Engine::LlamaCppPython.cannot_generate().unwrap().contains("not token ids"));
        assert!(Engine::Vllm.cannot_generate().is_none());
    }

    #[test]
    fn answers_without_ids_are_named() {
        let no_ids = r#"{"choices":[{"text":"x","logprobs":{"tokens":[" Paris"],"top_logprobs":[{" Paris":-0.1}]}}]}"#;
        let err = Engine::Vllm.parse_generated(&v(no_ids), 1).unwrap_err().to_string();
        assert!(err.contains("return_tokens_as_token_ids"), "{err}");
        let err = Engine::LlamaCpp.parse_generated(&v(r#"{"content":"x"}"#), 0).unwrap_err().to_string();
        assert!(err.contains("`tokens`"), "{err}");
    }

    #[test]
    fn chat_rendering_asks_each_engine_for_its_own_template() {
        let m = json!([{"role": "user", "content": "Hi"}]);
        let (path, body) = Engine::LlamaCpp.chat_render(&m, "x").unwrap();
        assert_eq!((path, &body), ("/apply-template", &json!({"messages": m})));
        // As llama-server's chat handler tokenises the rendered prompt.
        assert_eq!(Engine::llamacpp_chat_tokenize_body("p"), json!({"content": "p", "add_special": true, "parse_special": true}));
        let (path, body) = Engine::Vllm.chat_render(&m, "x").unwrap();
        assert_eq!(path, "/tokenize");
        assert_eq!(body["messages"], m);
        assert_eq!(body["add_generation_prompt"], json!(true));
        assert!(Engine::Sglang.chat_render(&m, "x").unwrap_err().to_string().contains("--chat-template"));
    }

    #[test]
    fn engines_are_detected_from_v1_models() {
        let m = |o: &str| json!({"object": "list", "data": [{"id": "m", "object": "model", "owned_by": o}]});
        assert_eq!(Engine::detect(&m("llamacpp")), Some(Engine::LlamaCpp));
        assert_eq!(Engine::detect(&m("vllm")), Some(Engine::Vllm));
        assert_eq!(Engine::detect(&m("sglang")), Some(Engine::Sglang));
        assert_eq!(Engine::detect(&m("me")), Some(Engine::LlamaCppPython));
        assert_eq!(Engine::detect(&m("openai")), None);
    }
}
