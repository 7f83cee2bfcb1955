//! kd-generate: teacher completions for prompts (a transfer set), or with `--score` the
//! teacher's top-K at every predicted position of existing records.
use anyhow::Context;
use clap::Parser;
use distillery::base::lock::OutputLock;
use distillery::data::shard::Shard;
use distillery::data::teacher_logits::LogitsFormat;
use distillery::model::tokenizer::chat_template;
use distillery::stages::transfer::{generate, score, TransferOptions};
use distillery::teacher::LocalTeacher;
use std::path::PathBuf;

#[derive(Parser)]
#[command(about = "Generate teacher completions for JSONL prompts")]
struct Args {
    /// Teacher model directory or hub id (or --teacher-url).
    #[arg(long, required_unless_present = "teacher_url", conflicts_with = "teacher_url")]
    teacher: Option<String>,
    /// JSONL records with `prompt` (or `text`, used as the prompt).
    #[arg(long)]
    prompts: PathBuf,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// 0 is greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long)]
    top_k: Option<i64>,
    #[arg(long)]
    top_p: Option<f64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Completions per prompt (ids get a `#sN` suffix and `parent` when above 1).
    #[arg(long, default_value_t = 1)]
    samples: usize,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Stop a completion once its text contains this string (repeatable); the token that
    /// completes it is kept.
    #[arg(long = "stop")]
    stop: Vec<String>,
    /// Render each prompt as a user turn through the tokenizer's chat template (with the
    /// generation prompt), as transformers' apply_chat_template does.
    #[arg(long)]
    chat_template: bool,
    /// With --teacher-url: render each prompt as a user turn through the served model's own
    /// chat template, by the server (llama.cpp `/apply-template` + `/tokenize`, vLLM
    /// `/tokenize` with messages): the prompt its /v1/chat/completions would generate from.
    #[arg(long, conflicts_with = "chat_template", requires = "teacher_url")]
    server_chat_template: bool,
    /// Scoring mode: no generation; store the teacher's top-K (--store-logits) at every
    /// predicted position of existing records (`text`, or `prompt` + `completion`).
    #[arg(long)]
    score: bool,
    /// Generate exactly --max-new-tokens tokens, ignoring EOS (for benchmarks).
    #[arg(long)]
    ignore_eos: bool,
    /// Also store the teacher's top-K log-probabilities at every completion position in
    /// `<out>.logits.safetensors` (kd-distill --teacher-logits reads it).
    #[arg(long)]
    store_logits: Option<i64>,
    /// The sidecar's format: safetensors (`<out>.logits.safetensors`, 6K + 2 bytes a token)
    /// or compact (`<out>.logits.topk`: ids as positions in a list of the record's recent
    /// ids, log-probabilities to 1/16 nat, about 112 bytes a token at K = 64 on SmolLM2's
    /// 49k vocabulary; docs/FORMATS.md).
    #[arg(long, default_value = "safetensors")]
    logits_format: LogitsFormat,
    /// Continue an interrupted run from its journal (`<out>.journal/`): finished batches are
    /// not redone, and the output is the same as an uninterrupted run's.
    #[arg(long)]
    resume: bool,
    /// Take shard I of N (I from 0): the prompts' I-th contiguous block of N, each record
    /// sampled with the same seed as in an unsharded run; kd-merge joins the shards.
    #[arg(long, value_name = "I/N")]
    shard: Option<Shard>,
    #[command(flatten)]
    runtime: kd_cli::Runtime,
    #[command(flatten)]
    served: kd_cli::ServedArgs,
}

fn main() {
    kd_cli::run("kd-generate", || {
        let a = Args::parse();
        let mut o = TransferOptions {
            prompts: a.prompts,
            out: a.out,
            max_new_tokens: a.max_new_tokens,
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            seed: a.seed,
            samples: a.samples,
            batch_size: a.batch_size,
            stop: a.stop,
            chat_template: None,
            server_chat_template: a.server_chat_template,
            ignore_eos: a.ignore_eos,
            store_logits: a.store_logits,
            logits_format: a.logits_format,
            resume: a.resume,
            shard: a.shard.unwrap_or(Shard::WHOLE),
        };
        o.validate(a.score)?;
        let _lock = OutputLock::acquire(&o.out)?;
        let records = distillery::data::records::read_jsonl_numbered(&o.prompts)?;
        o.shard.range(records.len())?;
        let k = a.store_logits.map(|k| k.max(0) as usize);
        if let Some(t) = a.served.connect(if a.score { None } else { k }, a.score)? {
            if a.score {
                anyhow::ensure!(k <= Some(a.served.teacher_top_k), "--score --store-logits {}: above --teacher-top-k {}", k.unwrap(), a.served.teacher_top_k);
                let summary = score(&o, &records, &t, &t.tok)?;
                return Ok(format!("{summary}\nteacher server: {}", t.describe()));
            }
            if a.chat_template {
                let tpl = chat_template(&t.files)?;
                o.chat_template = Some(tpl.with_context(|| format!("--chat-template: tokenizer `{}` has no chat template", t.files.name))?);
            }
            let (eos, pad) = (t.special.eos.clone(), t.special.pad.unwrap_or(0));
            let summary = generate(&o, &records, &t, &t.tok, &t.files, &eos, pad)?;
            return Ok(format!("{summary}\nteacher server: {}", t.describe()));
        }
        let name = a.teacher.as_deref().unwrap();
        let (device, kind) = a.runtime.resolve()?;
        let (model, files, tok) = distillery::model::load(name, device, kind)?;
        let teacher = LocalTeacher::new(model, files, tok)?;
        if a.score {
            return score(&o, &records, &teacher, &teacher.tok);
        }
        if a.chat_template {
            let t = chat_template(&teacher.files)?;
            o.chat_template = Some(t.with_context(|| format!("--chat-template: model `{name}` has no chat template"))?);
        }
        let (eos, pad) = (teacher.special.eos.clone(), teacher.special.pad.unwrap_or(0));
        generate(&o, &records, &teacher, &teacher.tok, &teacher.files, &eos, pad)
    });
}
