//! kd-chain: teacher -> TA1 -> ... -> student. Each hop builds the next, smaller model with
//! kd-init from the previous one and distils it with kd-distill, the previous model as its
//! teacher (Mirzadeh et al., teacher assistants). An interrupted chain resumes at its hop:
//! finished hops are skipped and an unfinished distillation continues from its checkpoint.
use crate::base::io::write_json_atomic;
use crate::base::lock::OutputLock;
use crate::base::signals::{self, Stopped};
use crate::stages::init::InitMethod;
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct ChainOptions {
    pub teacher: String,
    /// Hop shapes, `;`-separated, each a `,`-list of kd-init flags without dashes.
    pub sizes: String,
    pub data: PathBuf,
    pub out: PathBuf,
    pub steps: i64,
    pub init: InitMethod,
    pub calib: Option<PathBuf>,
    pub eval_data: Option<PathBuf>,
    /// Extra kd-distill flags for every hop, whitespace-separated.
    pub distill_args: String,
    pub seed: u64,
    pub device: String,
    /// Passed on to each hop's kd-distill (`--stop-signals`).
    pub stop_signals: String,
}

/// `layers=3,hidden=192` -> `["--layers", "3", "--hidden", "192"]`, checking the names.
fn hop_flags(spec: &str) -> Result<Vec<String>> {
    const ALLOWED: &[&str] = &["layers", "hidden", "heads", "kv-heads", "intermediate", "keep-layers"];
    let mut out = vec![];
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').with_context(|| format!("--sizes: `{part}` is not name=value"))?;
        ensure!(ALLOWED.contains(&k.trim()), "--sizes: unknown shape `{k}` (allowed: {})", ALLOWED.join(", "));
        out.push(format!("--{}", k.trim()));
        out.push(v.trim().to_string());
    }
    ensure!(!out.is_empty(), "--sizes: empty hop");
    Ok(out)
}

/// Runs one stage binary. The child gets its own process group, so a terminal's Ctrl-C or a
/// scheduler's signal to this group reaches it only through this process: each stop signal
/// kd-chain receives is forwarded once (the first makes kd-distill save and exit 75, a
/// second aborts it).
fn run_stage(bin_dir: &Path, name: &str, args: &[String]) -> Result<()> {
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    if let Some(sig) = signals::stop_requested() {
        let message = format!("stopped by {} before {name}; run the same kd-chain command again to continue", signals::signal_name(sig));
        return Err(Stopped { signal: sig, message }.into());
    }
    eprintln!("kd-chain: {name} {}", args.join(" "));
    let mut child = Command::new(bin_dir.join(name)).args(args).process_group(0).spawn().with_context(|| format!("starting {name}"))?;
    let mut forwarded = 0;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        while forwarded < signals::received() {
            let sig = signals::stop_requested().unwrap_or(libc::SIGTERM);
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, sig) };
            forwarded += 1;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    if let Some(sig) = signals::stop_requested() {
        let how = if status.code() == Some(signals::EXIT_STOPPED) { "saved its state and stopped".to_string() } else { format!("ended ({status})") };
        return Err(Stopped {
            signal: sig,
            message: format!("stopped by {}: {name} {how}; run the same kd-chain command again to continue", signals::signal_name(sig)),
        }
        .into());
    }
    if !status.success() {
        match status.signal() {
            Some(sig) => bail!("{name} was killed by {}", signals::signal_name(sig)),
            None => bail!("{name} failed ({status})"),
        }
    }
    Ok(())
}

/// Runs (or resumes) the chain; stage binaries are taken from `bin_dir`. Returns the summary line.
pub fn run(args: &ChainOptions, bin_dir: &Path) -> Result<String> {
    let hops: Vec<Vec<String>> = args.sizes.split(';').map(hop_flags).collect::<Result<_>>()?;
    ensure!(args.init != InitMethod::Prune || args.calib.is_some(), "--init prune needs --calib");
    let _lock = OutputLock::acquire(&args.out)?;
    let s = |p: &Path| p.display().to_string();
    let mut teacher = args.teacher.clone();
    let mut summary = vec![];
    for (i, flags) in hops.iter().enumerate() {
        let dir = args.out.join(format!("hop{}", i + 1));
        let init_dir = dir.join("init");
        let model_dir = dir.join("model");
        let done = dir.join("hop.json");
        if done.is_file() {
            eprintln!("kd-chain: hop {} already done", i + 1);
            let v: Value = serde_json::from_str(&std::fs::read_to_string(&done)?)?;
            summary.push(v);
            teacher = s(&model_dir);
            continue;
        }
        if !init_dir.join("model.safetensors").is_file() {
            let mut a = vec!["--teacher".into(), teacher.clone(), "--out".into(), s(&init_dir), "--init".into(), args.init.to_string()];
            a.extend(flags.iter().cloned());
            if let Some(c) = &args.calib {
                a.extend(["--calib".into(), s(c)]);
            }
            a.extend(["--seed".into(), args.seed.to_string(), "--device".into(), args.device.clone()]);
            run_stage(bin_dir, "kd-init", &a)?;
        }
        let mut a = vec![
            "--teacher".into(), teacher.clone(), "--student".into(), s(&init_dir), "--data".into(), s(&args.data),
            "--out".into(), s(&model_dir), "--steps".into(), args.steps.to_string(), "--seed".into(), args.seed.to_string(),
            "--device".into(), args.device.clone(), "--resume".into(), "--stop-signals".into(), args.stop_signals.clone(),
        ];
        if let Some(e) = &args.eval_data {
            a.extend(["--eval-data".into(), s(e)]);
        }
        a.extend(args.distill_args.split_whitespace().map(String::from));
        run_stage(bin_dir, "kd-distill", &a)?;
        let mut hop = json!({"hop": i + 1, "teacher": teacher, "shape": flags.join(" "), "model": s(&model_dir)});
        if let Some(e) = &args.eval_data {
            let metrics = dir.join("metrics.json");
            run_stage(bin_dir, "kd-eval", &["--model".into(), s(&model_dir), "--teacher".into(), teacher.clone(), "--data".into(), s(e),
                "--out".into(), s(&metrics), "--device".into(), args.device.clone(), "--name".into(), format!("hop{}", i + 1)])?;
            hop["metrics"] = serde_json::from_str(&std::fs::read_to_string(&metrics)?)?;
        }
        write_json_atomic(&done, &hop)?;
        summary.push(hop);
        teacher = s(&model_dir);
    }
    write_json_atomic(&args.out.join("chain.json"), &json!({"teacher": args.teacher, "hops": summary}))?;
    Ok(format!("chain of {} hop(s) done; student -> {}", hops.len(), teacher))
}
