//! A teacher behind an inference server (vLLM, SGLang, llama.cpp's `llama-server`), reached
//! over HTTP: the [`Teacher`] every stage already uses, so no stage forks.
//!
//! The client is `ureq` (blocking, already in the tree through hf-hub) on a pool of scoped
//! threads: one request per sequence, up to `concurrency` in flight, which is what lets the
//! server batch them (continuous batching in vLLM and SGLang, `--parallel` slots in
//! llama.cpp). An async stack (tokio + reqwest) would add a runtime and several minutes of
//! build for no gain at this level of concurrency.
//!
//! Every request has a timeout; 429, 5xx, refused or reset connections and timeouts are
//! retried with exponential backoff (so a restarted server is waited for), other answers
//! fail with the server's message. Requests carry their own seed, so a retried or resumed
//! request asks for the same completion.
use super::echo::{self, TokenStrings};
use super::engine::{Engine, GenRequest, TopRow};
use super::{Predictions, Query, SparseTeacher, Teacher};
use crate::base::rng::SplitMix64;
use crate::data::teacher_logits::TopRows;
use crate::model::decode::Sampling;
use crate::model::token_bytes::TokenBytes;
use crate::model::tokenizer::{SpecialTokens, Tok};
use crate::model::{ModelConfig, ModelFiles};
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;
use tch::{Kind, Tensor};

/// The environment variables an API key is read from, in order.
pub const API_KEY_VARS: [&str; 2] = ["DISTILLERY_TEACHER_API_KEY", "OPENAI_API_KEY"];

/// Text whose ids the server's tokenizer must agree on with the local one: words, digits,
/// punctuation, spaces, a newline and non-ASCII letters.
const PROBE_TEXT: &str = "Distillery probe: The quick brown fox jumps over 12345 lazy dogs; naïve café, 2026!\n  Done.";

#[derive(Clone, Debug)]
pub struct ServedOptions {
    /// Base URL, e.g. `http://127.0.0.1:8000` (a trailing `/v1` is accepted).
    pub url: String,
    /// A tokenizer.json directory, a Hugging Face model directory or hub id, or a `.gguf`.
    pub tokenizer: String,
    /// `None`: from the server's `/v1/models`.
    pub engine: Option<Engine>,
    pub concurrency: usize,
    pub timeout: Duration,
    pub retries: usize,
    /// Top-K returned by teacher-forced scoring (kd-filter, kd-eval, `--score`).
    pub score_top_k: usize,
}

/// The served-teacher settings a training run keeps in its configuration (the API key stays
/// in the environment).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ServedSettings {
    pub url: String,
    pub tokenizer: String,
    /// auto, llamacpp, vllm, sglang or llama-cpp-python.
    pub engine: String,
    pub concurrency: usize,
    pub timeout_s: f64,
    pub retries: usize,
    pub top_k: usize,
}

impl ServedSettings {
    pub fn options(&self) -> Result<ServedOptions> {
        ensure!(self.timeout_s > 0.0, "--teacher-timeout must be positive");
        Ok(ServedOptions {
            url: self.url.clone(),
            tokenizer: self.tokenizer.clone(),
            engine: Engine::parse(&self.engine)?,
            concurrency: self.concurrency,
            timeout: Duration::from_secs_f64(self.timeout_s),
            retries: self.retries,
            score_top_k: self.top_k,
        })
    }
}

/// What the capability probe found.
#[derive(Clone, Debug)]
pub struct Capabilities {
    pub engine: Engine,
    pub model: String,
    pub tokenizer_checked: bool,
    pub top_k_checked: Option<usize>,
    pub scoring: bool,
    /// The server puts a BOS before every text it is sent (llama-cpp-python, for models that
    /// ask for one).
    pub server_adds_bos: bool,
}

/// Teacher-forced scores of one sequence: the top-K row predicting each target, and the
/// target's own log-probability where the server gives it (always for vLLM and SGLang).
#[derive(Clone, Debug, PartialEq)]
pub struct Scored {
    pub rows: Vec<TopRow>,
    pub targets: Vec<Option<f64>>,
}

pub struct ServedTeacher {
    base: String,
    opts: ServedOptions,
    agent: ureq::Agent,
    api_key: Option<String>,
    pub caps: Capabilities,
    pub tok: Tok,
    pub files: ModelFiles,
    pub special: SpecialTokens,
    name: String,
    vocab: i64,
    /// Requests retried so far (faults survived).
    pub retried: AtomicU64,
    /// The local tokenizer's BOS, if it has one.
    bos: Option<i64>,
    /// Token strings (llama-cpp-python keys its log-probabilities by them).
    strings: OnceLock<TokenStrings>,
    /// Top entries llama-cpp-python named by a string that several tokens write (left out).
    pub ambiguous_entries: AtomicU64,
}

/// The BOS id: the config's `bos_token_id`, or the tokenizer config's `bos_token`.
fn local_bos(files: &ModelFiles, tok: &Tok) -> Result<Option<i64>> {
    if files.config.is_file() {
        if let Some(b) = ModelConfig::from_file(&files.config)?.bos_token_id {
            return Ok(Some(b));
        }
    }
    Ok(tokenizer_config_token(files, tok, "bos_token"))
}

/// The id of a special token named in tokenizer_config.json (`"eos_token": "</s>"` or
/// `{"content": "</s>", ...}`).
fn tokenizer_config_token(files: &ModelFiles, tok: &Tok, key: &str) -> Option<i64> {
    files
        .side_file("tokenizer_config.json")
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|c| match &c[key] {
            Value::String(s) => Some(s.clone()),
            v => v["content"].as_str().map(String::from),
        })
        .and_then(|s| tok.token_to_id(&s))
}

/// The tokenizer files `--teacher-tokenizer` names: a model directory or hub id or `.gguf`
/// (through the usual resolution), or a directory holding only tokenizer files.
pub fn tokenizer_files(spec: &str) -> Result<ModelFiles> {
    let dir = Path::new(spec);
    if dir.is_dir() && !dir.join("config.json").is_file() {
        ensure!(dir.join("tokenizer.json").is_file(), "--teacher-tokenizer {spec}: no tokenizer.json (or config.json) in this directory");
        let side_files = crate::model::checkpoint::SIDE_FILES.iter().map(|f| dir.join(f)).filter(|p| p.is_file()).collect();
        return Ok(ModelFiles { name: spec.to_string(), config: dir.join("config.json"), weights: vec![], side_files });
    }
    crate::model::checkpoint::resolve(spec).with_context(|| format!("--teacher-tokenizer {spec}"))
}

/// End-of-sequence ids from the model files, or from the tokenizer's `eos_token` when there
/// is no config.json.
fn special_tokens(files: &ModelFiles, tok: &Tok) -> Result<SpecialTokens> {
    if files.config.is_file() {
        return SpecialTokens::resolve(files, &ModelConfig::from_file(&files.config)?);
    }
    let eos = tokenizer_config_token(files, tok, "eos_token");
    Ok(SpecialTokens { eos: eos.into_iter().collect(), pad: eos })
}

fn retryable(code: u16) -> bool {
    code == 408 || code == 429 || code >= 500
}

impl ServedTeacher {
    /// Connects and runs the capability probe: the server's model and engine, that its
    /// tokenizer gives the local tokenizer's ids, that it returns token ids (and `top_k`
    /// log-probabilities, when asked), and with `scoring` that it can score given text.
    pub fn connect(opts: ServedOptions, top_k: Option<usize>, scoring: bool) -> Result<ServedTeacher> {
        ensure!(opts.concurrency >= 1, "--teacher-concurrency must be at least 1");
        let base = opts.url.trim_end_matches('/').trim_end_matches("/v1").to_string();
        ensure!(base.starts_with("http://") || base.starts_with("https://"), "--teacher-url {}: expected http://HOST:PORT or https://...", opts.url);
        let files = tokenizer_files(&opts.tokenizer)?;
        let tok = Tok::load(&files)?;
        let special = special_tokens(&files, &tok)?;
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(10).min(opts.timeout))
            .timeout(opts.timeout)
            .max_idle_connections_per_host(opts.concurrency.max(1))
            .build();
        let api_key = API_KEY_VARS.iter().find_map(|v| std::env::var(v).ok().filter(|k| !k.is_empty()));
        let caps = Capabilities {
            engine: Engine::LlamaCpp,
            model: String::new(),
            tokenizer_checked: false,
            top_k_checked: None,
            scoring: false,
            server_adds_bos: false,
        };
        let bos = local_bos(&files, &tok)?;
        let mut t = ServedTeacher {
            base,
            opts,
            agent,
            api_key,
            caps,
            // The model's vocabulary (embeddings may be padded past the tokenizer's).
            vocab: if files.config.is_file() { ModelConfig::from_file(&files.config)?.vocab_size } else { tok.vocab_size() as i64 },
            tok,
            files,
            special,
            name: String::new(),
            retried: AtomicU64::new(0),
            bos,
            strings: OnceLock::new(),
            ambiguous_entries: AtomicU64::new(0),
        };
        t.probe(top_k, scoring)?;
        Ok(t)
    }

    fn probe(&mut self, top_k: Option<usize>, scoring: bool) -> Result<()> {
        let models = self.get("/v1/models").with_context(|| format!("teacher server {}: no answer to GET /v1/models", self.base))?;
        let model = models["data"][0]["id"].as_str().with_context(|| format!("teacher server {}: /v1/models lists no model: {models}", self.base))?.to_string();
        let engine = match (self.opts.engine, Engine::detect(&models)) {
            (Some(e), _) => e,
            (None, Some(e)) => e,
            (None, None) => bail!(
                "teacher server {}: cannot tell its engine from /v1/models (owned_by {}); give --teacher-engine llamacpp, vllm or sglang",
                self.base,
                models["data"][0]["owned_by"]
            ),
        };
        self.caps.engine = engine;
        self.caps.model = model.clone();
        self.name = model.clone();
        let ctx = || format!("teacher server {} ({}, model `{model}`)", self.base, engine.name());
        // The tokenizers must agree, or every id in every record means something else.
        let local = self.tok.encode(PROBE_TEXT, false)?;
        let (path, body) = engine.tokenize_request(PROBE_TEXT, &model);
        match self.post(path, &body) {
            Ok(v) => {
                let remote = Engine::parse_tokens(&v).with_context(ctx)?;
                // llama-cpp-python adds the model's BOS whatever it is asked, as it does to
                // every text it scores.
                self.caps.server_adds_bos =
                    engine == Engine::LlamaCppPython && self.bos.is_some() && remote.first() == self.bos.as_ref() && remote[1..] == local[..];
                if remote != local && !self.caps.server_adds_bos {
                    let at = remote.iter().zip(&local).position(|(a, b)| a != b).unwrap_or(remote.len().min(local.len()));
                    bail!(
                        "{}: its tokenizer and --teacher-tokenizer {} give different ids for the probe text {PROBE_TEXT:?} \
                         (first difference at token {at}: server {:?}, local {:?}); point --teacher-tokenizer at the served model's tokenizer",
                        ctx(),
                        self.opts.tokenizer,
                        remote.get(at),
                        local.get(at)
                    );
                }
                self.caps.tokenizer_checked = true;
            }
            Err(e) if engine == Engine::Sglang => eprintln!("{}: tokenizer agreement not checked (/tokenize: {e:#})", ctx()),
            Err(e) => return Err(e.context(format!("{}: POST {path}", ctx()))),
        }
        let mut prompt = self.tok.encode(PROBE_TEXT, true)?;
        prompt.truncate(8);
        let k = top_k.unwrap_or(0);
        if let Some(why) = engine.cannot_generate() {
            ensure!(scoring && k == 0, "{}: {why}", ctx());
            let ctx = ctx();
            return self.probe_echo(&prompt, &ctx);
        }
        // Token ids and top-K of generated tokens.
        let req = GenRequest { prompt: &prompt, max_tokens: 2, temperature: 0.0, top_p: None, top_k: None, seed: 0, top_logprobs: k, ignore_eos: true, stop: &[] };
        let answer = self.post(engine.generate_path(), &engine.generate_body(&req, &model)).map_err(|e| {
            let hint = if k > 0 { format!(" (top-{k} log-probabilities were asked for: {})", engine.logprobs_flag()) } else { String::new() };
            e.context(format!("{}: the probe generation failed{hint}", ctx()))
        })?;
        let g = engine.parse_generated(&answer, k).map_err(|e| {
            e.context(format!("{}: the probe generation's answer{}", ctx(), if k > 0 { format!("; {}", engine.logprobs_flag()) } else { String::new() }))
        })?;
        ensure!(!g.ids.is_empty(), "{}: the probe generation returned no tokens", ctx());
        if k > 0 {
            self.caps.top_k_checked = Some(k);
        }
        if scoring {
            let body = engine.score_body(&prompt, self.opts.score_top_k, &model).with_context(ctx)?;
            let v = self.post(score_path(engine), &body).map_err(|e| e.context(format!("{}: the probe scoring request failed ({})", ctx(), engine.logprobs_flag())))?;
            engine.parse_scored(&v, &prompt, 1, self.opts.score_top_k).with_context(|| format!("{}: the probe scoring answer", ctx()))?;
            self.caps.scoring = true;
        }
        eprintln!(
            "teacher server {}: {}, model `{model}`; tokenizer {}; token ids returned{}{}; {} requests in flight",
            self.base,
            engine.name(),
            if self.caps.tokenizer_checked { "agrees with --teacher-tokenizer" } else { "not checked" },
            if k > 0 { format!("; top-{k} log-probabilities returned") } else { String::new() },
            if scoring { format!("; teacher-forced top-{} returned", self.opts.score_top_k) } else { String::new() },
            self.opts.concurrency
        );
        Ok(())
    }

    /// llama-cpp-python: builds the token strings and checks that its echoed rows line up as
    /// [`echo`] reads them: the row its echo gives for the last token of a probe must be the
    /// row it gives as the next-token distribution of the text before it, with a leading BOS
    /// and without.
    fn probe_echo(&mut self, prompt: &[i64], ctx: &str) -> Result<()> {
        let strings = TokenStrings::new(&TokenBytes::of(&self.tok)?);
        let ambiguous = strings.ambiguous();
        let _ = self.strings.set(strings);
        let body: Vec<i64> = prompt.iter().copied().filter(|&t| Some(t) != self.bos).collect();
        let mut probes = vec![];
        if let Some(b) = self.bos {
            probes.push([&[b][..], &body].concat());
        }
        if !self.caps.server_adds_bos {
            probes.push(body.clone());
        }
        let k = self.opts.score_top_k;
        for seq in &probes {
            let last = seq.len() - 1;
            let echoed = self.score(seq, last).with_context(|| format!("{}: the probe scoring request ({})", ctx, self.caps.engine.logprobs_flag()))?;
            let text = self.echo_text(&seq[..last])?;
            let v = self.post("/v1/completions", &echo::next_body(&text, k + echo::MARGIN, &self.caps.model)).with_context(|| ctx.to_string())?;
            let (next, _, _) = echo::parse_next(&v, self.strings.get().expect("set above"), seq[last]).with_context(|| ctx.to_string())?;
            let (a, b) = (&echoed.rows[0][..5.min(k)], &next[..5.min(k).min(next.len())]);
            // The same tokens in the same order; the values differ in the last digits (one
            // pass over the whole text against one over the prefix: other batch shapes).
            let agree = a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.0 == y.0 && (x.1 - y.1).abs() < 0.05);
            ensure!(
                agree,
                "{}: the echoed row predicting the last token of a probe ({a:?}) is not the server's next-token row for the text \
                 before it ({b:?}); this llama-cpp-python lays out its echo log-probabilities differently from version 0.3, which \
                 Distillery reads (score through vLLM or SGLang)",
                ctx
            );
        }
        self.caps.scoring = true;
        eprintln!(
            "teacher server {}: llama-cpp-python, model `{}`; tokenizer {}; scoring by echo checked{}; {ambiguous} token strings name \
             several tokens (left out of rows); {} requests in flight (it serves one at a time)",
            self.base,
            self.caps.model,
            if self.caps.tokenizer_checked { "agrees with --teacher-tokenizer" } else { "not checked" },
            if self.caps.server_adds_bos { " (it adds a BOS to every text)" } else { "" },
            self.opts.concurrency
        );
        Ok(())
    }

    /// The text llama-cpp-python is sent for `seq`: the ids decoded with their special tokens
    /// (it parses them back), without the BOS it adds itself.
    fn echo_text(&self, seq: &[i64]) -> Result<String> {
        let ids = if self.caps.server_adds_bos {
            ensure!(
                seq.first().is_some() && seq.first() == self.bos.as_ref(),
                "llama-cpp-python puts a BOS before every text, and these ids do not begin with one: it would score another sequence"
            );
            &seq[1..]
        } else {
            seq
        };
        self.tok.decode(ids, false)
    }

    /// Top-K of each scored row (`--teacher-top-k`).
    pub fn score_top_k(&self) -> usize {
        self.opts.score_top_k
    }

    /// [`Self::score`] of each `(ids, from)`, up to `concurrency` in flight.
    pub fn score_many(&self, seqs: &[(&[i64], usize)]) -> Result<Vec<Scored>> {
        self.map_concurrent(seqs.len(), |i| self.score(seqs[i].0, seqs[i].1).with_context(|| format!("{}: scoring sequence {i}", self.base)))
    }

    /// Teacher-forced scores of `ids` from target `from` (at least 1): the top-K
    /// (`score_top_k`) row predicting each target and the target's log-probability.
    pub fn score(&self, ids: &[i64], from: usize) -> Result<Scored> {
        let engine = self.caps.engine;
        let k = self.opts.score_top_k;
        ensure!(from >= 1 && from < ids.len(), "scoring from token {from} of a sequence of {}", ids.len());
        if engine != Engine::LlamaCppPython {
            let v = self.post(score_path(engine), &engine.score_body(ids, k, &self.caps.model)?)?;
            let rows = engine.parse_scored(&v, ids, from, k)?;
            let targets = engine.parse_scored_targets(&v, ids, from)?.into_iter().map(Some).collect();
            return Ok(Scored { rows, targets });
        }
        let strings = self.strings.get().context("llama-cpp-python's token strings were not built (the probe did not run)")?;
        let kk = k + echo::MARGIN;
        let v = self.post("/v1/completions", &echo::score_body(&self.echo_text(ids)?, kk, &self.caps.model))?;
        let mut s = echo::parse_echo(&v, ids, self.bos, strings, from)?;
        let mut dropped = s.dropped;
        // Rows the echo leaves out (the first, those at a BOS): the next-token row of the prefix.
        for (i, row) in s.rows.iter_mut().enumerate().filter(|(_, r)| r.is_none()) {
            let t = from + i;
            let text = self.echo_text(&ids[..t])?;
            ensure!(
                !text.is_empty(),
                "llama-cpp-python gives no row predicting token {t}, which follows the BOS alone (its echo leaves the first position \
                 out, and it cannot complete an empty text): score completions after a prompt, or through vLLM or SGLang"
            );
            let v = self.post("/v1/completions", &echo::next_body(&text, kk, &self.caps.model))?;
            let (r, target, d) = echo::parse_next(&v, strings, ids[t])?;
            *row = Some(r);
            s.targets[i] = target;
            dropped += d;
        }
        self.ambiguous_entries.fetch_add(dropped as u64, Ordering::Relaxed);
        let rows = s
            .rows
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                let mut r = r.expect("every gap was fetched");
                ensure!(
                    r.len() >= k,
                    "token {}: {} of the top-{kk} remain once the token strings that name several tokens are left out; lower --teacher-top-k",
                    from + i,
                    r.len()
                );
                r.truncate(k);
                Ok(r)
            })
            .collect::<Result<_>>()?;
        Ok(Scored { rows, targets: s.targets })
    }

    fn request(&self, method: &str, path: &str) -> ureq::Request {
        let mut r = self.agent.request(method, &format!("{}{path}", self.base)).set("Content-Type", "application/json");
        if let Some(k) = &self.api_key {
            r = r.set("Authorization", &format!("Bearer {k}"));
        }
        r
    }

    fn get(&self, path: &str) -> Result<Value> {
        self.with_retries(path, || self.request("GET", path).call())
    }

    fn post(&self, path: &str, body: &Value) -> Result<Value> {
        let text = body.to_string();
        self.with_retries(path, || self.request("POST", path).send_string(&text))
    }

    /// Sends until an answer, retrying 408/429/5xx, connection failures and timeouts with
    /// exponential backoff (0.25 s doubling to 8 s); other statuses fail at once with the
    /// server's message.
    fn with_retries(&self, path: &str, send: impl Fn() -> Result<ureq::Response, ureq::Error>) -> Result<Value> {
        let mut attempt = 0;
        loop {
            let failure = match send() {
                Ok(resp) => {
                    let mut text = String::new();
                    match resp.into_reader().read_to_string(&mut text) {
                        Ok(_) => return serde_json::from_str(&text).with_context(|| format!("{}{path}: the answer is not JSON: {}", self.base, clip(&text))),
                        Err(e) => format!("reading the answer: {e}"),
                    }
                }
                Err(ureq::Error::Status(code, resp)) => {
                    let body = resp.into_string().unwrap_or_default();
                    if !retryable(code) {
                        bail!("{}{path}: HTTP {code}: {}", self.base, clip(&body));
                    }
                    format!("HTTP {code}: {}", clip(&body))
                }
                Err(ureq::Error::Transport(t)) => t.to_string(),
            };
            attempt += 1;
            if attempt > self.opts.retries {
                bail!("{}{path}: gave up after {attempt} attempts (--teacher-retries {}): {failure}", self.base, self.opts.retries);
            }
            self.retried.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_secs_f64((0.25 * 2f64.powi(attempt as i32 - 1)).min(8.0)));
        }
    }

    /// `f(i)` for `i` in `0..n` with up to `concurrency` in flight; results in order, or the
    /// first error (in index order) once the requests already sent have finished.
    fn map_concurrent<T: Send>(&self, n: usize, f: impl Fn(usize) -> Result<T> + Sync) -> Result<Vec<T>> {
        let next = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        let slots: Mutex<Vec<Option<Result<T>>>> = Mutex::new((0..n).map(|_| None).collect());
        std::thread::scope(|s| {
            for _ in 0..self.opts.concurrency.min(n) {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= n || failed.load(Ordering::SeqCst) {
                        break;
                    }
                    let r = f(i);
                    if r.is_err() {
                        failed.store(true, Ordering::SeqCst);
                    }
                    slots.lock().unwrap()[i] = Some(r);
                });
            }
        });
        let mut out = Vec::with_capacity(n);
        for (i, r) in slots.into_inner().unwrap().into_iter().enumerate() {
            match r {
                Some(r) => out.push(r?),
                None => bail!("request {i} was not sent after an earlier one failed"),
            }
        }
        Ok(out)
    }

    /// Generates every prompt (one request each); with `k` the top-`k` of every generated
    /// token. Stop strings are applied here: a completion ends at the token that completes
    /// one (kept, as with a local teacher), and its rows with it.
    pub fn generate_rows(
        &self,
        prompts: &[Vec<i64>],
        sampling: &Sampling,
        rngs: &mut [SplitMix64],
        stop: &dyn Fn(&[i64]) -> bool,
        k: Option<i64>,
    ) -> Result<(Vec<Vec<i64>>, Option<Vec<TopRows>>)> {
        let engine = self.caps.engine;
        if let Some(why) = engine.cannot_generate() {
            bail!("teacher server {}: {why}", self.base);
        }
        let seeds: Vec<u32> = rngs.iter_mut().map(|r| (r.next_u64() & 0x7fff_ffff) as u32).collect();
        let kk = k.unwrap_or(0) as usize;
        let outs = self.map_concurrent(prompts.len(), |i| {
            let req = GenRequest {
                prompt: &prompts[i],
                max_tokens: sampling.max_new_tokens,
                temperature: sampling.temperature,
                top_p: sampling.top_p,
                top_k: sampling.top_k,
                seed: seeds[i],
                top_logprobs: kk,
                ignore_eos: sampling.eos.is_empty(),
                stop: &sampling.stop,
            };
            let v = self.post(engine.generate_path(), &engine.generate_body(&req, &self.caps.model))?;
            let mut g = engine.parse_generated(&v, kk).with_context(|| format!("{}{}: prompt {i}", self.base, engine.generate_path()))?;
            self.fill_missing(&prompts[i], &mut g, kk)?;
            Ok(g)
        })?;
        let mut outs = outs;
        for g in &mut outs {
            // The first token that completes a stop string ends the completion.
            if let Some(end) = (1..=g.ids.len()).find(|&n| stop(&g.ids[..n])) {
                g.ids.truncate(end);
                if let Some(t) = &mut g.top {
                    t.truncate(end);
                }
            }
        }
        let rows = match k {
            Some(k) => Some(outs.iter().map(|g| top_rows(g.top.as_deref().unwrap_or_default(), k)).collect::<Result<Vec<_>>>()?),
            None => None,
        };
        Ok((outs.into_iter().map(|g| g.ids).collect(), rows))
    }
}

impl ServedTeacher {
    /// The prompt ids the server's own chat endpoint would generate from for each prompt as
    /// a user turn: its chat template and its tokenisation (`--server-chat-template`).
    /// Generating from these ids through the raw endpoint is what `/v1/chat/completions`
    /// does, with every generated id returned (llama.cpp's chat answers carry ids only inside
    /// their log-probabilities, which it leaves out at split UTF-8 characters, and no
    /// prompt ids).
    pub fn chat_prompt_ids(&self, prompts: &[String]) -> Result<Vec<Vec<i64>>> {
        let engine = self.caps.engine;
        self.map_concurrent(prompts.len(), |i| {
            let messages = json!([{"role": "user", "content": prompts[i]}]);
            let (path, body) = engine.chat_render(&messages, &self.caps.model)?;
            let v = self.post(path, &body)?;
            let ids = match engine {
                Engine::LlamaCpp => {
                    let text = v["prompt"].as_str().with_context(|| format!("{}/apply-template: the answer has no `prompt`", self.base))?;
                    Engine::parse_tokens(&self.post("/tokenize", &Engine::llamacpp_chat_tokenize_body(text))?)?
                }
                _ => Engine::parse_tokens(&v)?,
            };
            ensure!(!ids.is_empty(), "{}: the server rendered prompt {i} to no tokens", self.base);
            Ok(ids)
        })
    }

    /// Rows llama.cpp left out (tokens ending inside a UTF-8 character), one request each:
    /// the prompt and the completion up to the position, one forced ASCII token generated.
    fn fill_missing(&self, prompt: &[i64], g: &mut super::engine::Generated, k: usize) -> Result<()> {
        if g.missing.is_empty() {
            return Ok(());
        }
        let filler = match self.tok.encode("a", false)?.as_slice() {
            [id] => *id,
            _ => bail!("llama.cpp left out the log-probabilities of {} tokens, and the tokenizer has no single token for `a` to fetch them with", g.missing.len()),
        };
        let top = g.top.as_mut().expect("missing rows come with rows");
        for &m in &g.missing {
            let prefix: Vec<i64> = prompt.iter().chain(&g.ids[..m]).copied().collect();
            let v = self.post("/completion", &super::engine::llamacpp_position_body(&prefix, k, filler))?;
            let row = self.caps.engine.parse_generated(&v, k).with_context(|| format!("fetching the top-{k} of token {m}"))?;
            let row = row.top.and_then(|t| t.into_iter().next()).filter(|r| r.len() >= k);
            top[m] = row.with_context(|| format!("llama.cpp returned no top-{k} for token {m} of a completion"))?;
        }
        g.missing.clear();
        Ok(())
    }
}

fn score_path(engine: Engine) -> &'static str {
    engine.generate_path()
}

fn clip(s: &str) -> String {
    let s = s.trim();
    match s.char_indices().nth(400) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

/// Stored rows from served top-K rows: the `k` best of each, the tail mass computed in f64.
fn top_rows(rows: &[TopRow], k: i64) -> Result<TopRows> {
    let (idx, lp, tail) = sparse_parts(rows, k)?;
    let n = rows.len() as i64;
    Ok(TopRows {
        indices: Tensor::from_slice(&idx).view([n, k]).to_kind(Kind::Int),
        logprobs: Tensor::from_slice(&lp).view([n, k]).to_kind(Kind::Half),
        tail_logmass: Tensor::from_slice(&tail).to_kind(Kind::Half),
    })
}

/// Served top-K rows as the sparse teacher the losses read (fp32 on the CPU).
pub fn sparse_teacher(rows: &[TopRow], k: i64) -> Result<SparseTeacher> {
    let (idx, lp, tail) = sparse_parts(rows, k)?;
    let n = rows.len() as i64;
    Ok(SparseTeacher {
        indices: Tensor::from_slice(&idx).view([n, k]),
        logprobs: Tensor::from_slice(&lp).view([n, k]),
        tail_logmass: Tensor::from_slice(&tail),
    })
}

fn sparse_parts(rows: &[TopRow], k: i64) -> Result<(Vec<i64>, Vec<f32>, Vec<f32>)> {
    let (mut idx, mut lp, mut tail) = (vec![], vec![], vec![]);
    for (i, r) in rows.iter().enumerate() {
        ensure!(r.len() as i64 >= k, "position {i}: {} top log-probabilities, {k} needed", r.len());
        let top = &r[..k as usize];
        let mass: f64 = top.iter().map(|(_, l)| l.exp()).sum();
        idx.extend(top.iter().map(|(t, _)| *t));
        lp.extend(top.iter().map(|(_, l)| *l as f32));
        tail.push((1.0 - mass).max(1e-30).ln() as f32);
    }
    Ok((idx, lp, tail))
}

impl Teacher for ServedTeacher {
    fn name(&self) -> &str {
        &self.name
    }

    fn served(&self) -> Option<&ServedTeacher> {
        Some(self)
    }

    fn vocab_size(&self) -> i64 {
        self.vocab
    }

    fn generate(&self, prompts: &[Vec<i64>], sampling: &Sampling, rngs: &mut [SplitMix64], stop: &dyn Fn(&[i64]) -> bool) -> Result<Vec<Vec<i64>>> {
        Ok(self.generate_rows(prompts, sampling, rngs, stop, None)?.0)
    }

    fn generate_top(
        &self,
        prompts: &[Vec<i64>],
        sampling: &Sampling,
        rngs: &mut [SplitMix64],
        stop: &dyn Fn(&[i64]) -> bool,
        k: Option<i64>,
        _batch: usize,
    ) -> Result<(Vec<Vec<i64>>, Option<Vec<TopRows>>)> {
        self.generate_rows(prompts, sampling, rngs, stop, k)
    }

    /// The server's top-K (`score_top_k`) at every target: a [`Predictions::TopK`] per query.
    fn predict(&self, queries: &[Query], _batch: usize, sink: &mut dyn FnMut(usize, i64, Predictions) -> Result<()>) -> Result<()> {
        let k = self.opts.score_top_k;
        let rows = self.map_concurrent(queries.len(), |i| {
            let q = &queries[i];
            let from = q.from.max(1);
            if from >= q.ids.len() {
                return Ok(vec![]);
            }
            Ok(self.score(q.ids, from).with_context(|| format!("{}: scoring record {}", self.base, q.record))?.rows)
        })?;
        for (i, r) in rows.iter().enumerate() {
            sink(i, 0, Predictions::TopK(sparse_teacher(r, k as i64)?))?;
        }
        Ok(())
    }
}

impl ServedTeacher {
    /// A one-line account of the server for summaries.
    pub fn describe(&self) -> Value {
        let mut d = json!({"engine": self.caps.engine.name(), "model": self.caps.model, "retried_requests": self.retried.load(Ordering::Relaxed)});
        if self.caps.engine == Engine::LlamaCppPython {
            d["ambiguous_top_entries_left_out"] = json!(self.ambiguous_entries.load(Ordering::Relaxed));
        }
        d
    }
}
