//! kd-eval: everything a distilled model is judged on: perplexity (and with `--teacher`, KL
//! from and top-1 agreement with the teacher), multiple choice and cloze accuracy, ROUGE-L,
//! side-by-side generations, size, latency, throughput and peak memory; 95% intervals
//! beside every mean and a per-item sidecar for kd-report's paired tests. With `--targeted`,
//! the model's answers to the user's own prompts scored against their references (exact
//! match, F1, contains, ROUGE-L, and `--judge`'s grade); with `--pairwise A B --judge J
//! --prompts FILE`, two models' answers compared by a judge in both orders.
use clap::Parser;
use distillery::stages::eval::compare::{run_pairwise, PairwiseOptions};
use distillery::stages::eval::judge::{Judge, JudgeModel, JudgeTemplate};
use distillery::stages::eval::{run, EvalOptions};
use std::path::PathBuf;

#[derive(Parser)]
#[command(about = "Evaluate a model: perplexity, teacher agreement, tasks, size and speed")]
struct Args {
    /// Model directory, hub id or .gguf.
    #[arg(long, required_unless_present = "pairwise")]
    model: Option<String>,
    /// JSONL records with `text` or `prompt` (+ `completion`) for perplexity.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Where to write the metrics JSON.
    #[arg(long)]
    out: PathBuf,
    /// Teacher model: adds `teacher_kl`, `top1_agreement` and teacher generations.
    #[arg(long, conflicts_with = "teacher_url")]
    teacher: Option<String>,
    /// Multiple-choice records (`prompt`, `choices`, `label`).
    #[arg(long)]
    mc: Option<PathBuf>,
    /// Cloze records (`prompt`, `completion` = the missing last word).
    #[arg(long)]
    cloze: Option<PathBuf>,
    /// Generative records (`prompt`, reference `completion`): ROUGE-L of greedy completions.
    #[arg(long)]
    generate: Option<PathBuf>,
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// Render the --generate prompts through each model's chat template (instruction models).
    #[arg(long)]
    chat_template: bool,
    /// Markdown file of side-by-side teacher and model completions for the --generate prompts.
    #[arg(long)]
    samples_out: Option<PathBuf>,
    /// The teacher's side of --samples-out from an answers file (`id`, `output`: the teacher's
    /// own `kd-eval --answers-out`) instead of generating it again for every model.
    #[arg(long)]
    teacher_answers: Option<PathBuf>,
    /// Items used per task at most.
    #[arg(long)]
    limit: Option<usize>,
    /// Measure latency (batch 1) and throughput (batch --speed-batch), prompted with the
    /// start of the first evaluated record.
    #[arg(long)]
    speed: bool,
    #[arg(long, default_value_t = 8)]
    speed_batch: usize,
    /// Rounds of the speed measurement after two warm-up runs; the median and the range
    /// over rounds are reported.
    #[arg(long, default_value_t = 5)]
    speed_repeats: usize,
    /// Curve label for kd-report (for example ce, kd, kd-cos, chain, teacher).
    #[arg(long)]
    strategy: Option<String>,
    /// Bootstrap resamples behind the 95% intervals of perplexity, teacher KL, agreement and
    /// ROUGE-L (seed 0: the same inputs give the same intervals).
    #[arg(long, default_value_t = distillery::base::stats::BOOTSTRAP_SAMPLES)]
    bootstrap_samples: usize,
    /// Append a row to this CSV (one row per evaluated model).
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Label for reports (default: the model argument).
    #[arg(long)]
    name: Option<String>,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Truncate each perplexity record to this many tokens.
    #[arg(long)]
    max_length: Option<usize>,
    /// Continue the perplexity pass of an interrupted run from its journal
    /// (`<out>.journal/`); the result is the same as an uninterrupted run's.
    #[arg(long)]
    resume: bool,
    /// Evaluate shard I of N (I from 0) of --data: its I-th contiguous block of N records;
    /// kd-merge recombines the shards' token-weighted metrics exactly.
    #[arg(long, value_name = "I/N")]
    shard: Option<distillery::data::shard::Shard>,
    /// Targeted records: `prompt` with a short `answer` (or `answers`, a list) or a long
    /// `reference`; the model's greedy answers are scored against them.
    #[arg(long)]
    targeted: Option<PathBuf>,
    /// JSONL of the model's answers (`id`, `prompt`, `output`) to the --targeted (else
    /// --generate) prompts, for a later `--pairwise` to read.
    #[arg(long)]
    answers_out: Option<PathBuf>,
    /// The judge: a model (directory, hub id, .gguf) or a server's URL (then
    /// --judge-tokenizer too; engine, retries and top-K from the --teacher-* flags). It grades
    /// --targeted answers against their references, or compares the --pairwise models.
    #[arg(long)]
    judge: Option<String>,
    /// The served judge's tokenizer (a directory, hub id or .gguf), for a --judge URL.
    #[arg(long)]
    judge_tokenizer: Option<String>,
    /// The judge's prompts and labels (default: pipelines/templates/judge.json, built in).
    #[arg(long)]
    judge_template: Option<PathBuf>,
    /// Tokens of each judge reply kept in the sidecar for audit (the verdict is read from
    /// log-probabilities, not from this text).
    #[arg(long, default_value_t = 16)]
    judge_raw_tokens: usize,
    /// Two models (directories, hub ids, .gguf) or answers files (.jsonl from
    /// --answers-out) to compare on --prompts; needs --judge.
    #[arg(long, num_args = 2, value_names = ["A", "B"], requires_all = ["judge", "prompts"], conflicts_with_all = ["model", "data", "mc", "cloze", "generate", "targeted", "speed"])]
    pairwise: Option<Vec<String>>,
    /// Names of the --pairwise sides in the results (default: their paths' last parts).
    #[arg(long, num_args = 2, value_names = ["NAME_A", "NAME_B"], requires = "pairwise")]
    pairwise_names: Option<Vec<String>>,
    /// Prompts for --pairwise (`id`, `prompt`; references, if any, are not used there).
    #[arg(long, requires = "pairwise")]
    prompts: Option<PathBuf>,
    #[command(flatten)]
    runtime: kd_cli::Runtime,
    /// A served teacher (instead of --teacher) gives `teacher_kl` and `top1_agreement`
    /// from its top-K (--teacher-top-k): the bucketed approximations of docs/FORMATS.md.
    #[command(flatten)]
    served: kd_cli::ServedArgs,
}

/// The last part of a path (a model directory or an answers file), as a name.
fn side_name(side: &str) -> String {
    let p = std::path::Path::new(side.trim_end_matches('/'));
    let stem = if side.ends_with(".jsonl") { p.file_stem() } else { p.file_name() };
    stem.map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| side.to_string())
}

fn main() {
    kd_cli::run("kd-eval", || {
        let a = Args::parse();
        let (device, kind) = a.runtime.resolve()?;
        let judge = match &a.judge {
            Some(spec) => {
                let model = if spec.starts_with("http://") || spec.starts_with("https://") {
                    let tokenizer = a.judge_tokenizer.clone().ok_or_else(|| anyhow::anyhow!("--judge {spec} is a server: give --judge-tokenizer"))?;
                    JudgeModel::Served(a.served.connect_to(spec, &tokenizer)?)
                } else {
                    JudgeModel::local(spec, device, kind)?
                };
                let (template, source) = JudgeTemplate::load(a.judge_template.as_deref())?;
                Some(Judge::new(model, template, source, a.judge_raw_tokens, a.batch_size)?)
            }
            None => None,
        };
        if let Some(sides) = a.pairwise {
            let names = a.pairwise_names.unwrap_or_else(|| sides.iter().map(|s| side_name(s)).collect());
            return run_pairwise(&PairwiseOptions {
                judge: judge.expect("clap requires --judge with --pairwise"),
                sides: [sides[0].clone(), sides[1].clone()],
                names: [names[0].clone(), names[1].clone()],
                prompts: a.prompts.expect("clap requires --prompts with --pairwise"),
                out: a.out,
                samples_out: a.samples_out,
                chat_template: a.chat_template,
                max_new_tokens: a.max_new_tokens,
                limit: a.limit,
                batch_size: a.batch_size,
                bootstrap_samples: a.bootstrap_samples,
                device,
                kind,
            });
        }
        let served = a.served.connect(None, true)?;
        run(&EvalOptions {
            model: a.model.expect("clap requires --model without --pairwise"),
            teacher: a.teacher,
            data: a.data,
            mc: a.mc,
            cloze: a.cloze,
            generate: a.generate,
            samples_out: a.samples_out,
            teacher_answers: a.teacher_answers,
            out: a.out,
            csv: a.csv,
            name: a.name,
            max_new_tokens: a.max_new_tokens,
            chat_template: a.chat_template,
            limit: a.limit,
            speed: a.speed,
            speed_batch: a.speed_batch,
            speed_repeats: a.speed_repeats,
            strategy: a.strategy,
            bootstrap_samples: a.bootstrap_samples,
            batch_size: a.batch_size,
            max_length: a.max_length,
            device,
            kind,
            resume: a.resume,
            shard: a.shard.unwrap_or(distillery::data::shard::Shard::WHOLE),
            served,
            targeted: a.targeted,
            answers_out: a.answers_out,
            judge,
        })
    });
}
