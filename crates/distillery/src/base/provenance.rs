//! The command log behind kd-report's reproducibility card. When `KD_COMMAND_LOG` names a
//! file, every stage binary appends one JSON line per finished invocation: its exact
//! command line, working directory, duration, outcome and the versions compiled in. The
//! pipelines set it to `$(RUN)/commands.jsonl`; kd-report reads it with `--commands`.
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;

/// The environment variable naming the command log.
pub const COMMAND_LOG_ENV: &str = "KD_COMMAND_LOG";
/// tch as locked in Cargo.lock, and the libtorch (torch wheel) it was built against.
pub const TCH_VERSION: &str = env!("DISTILLERY_TCH_VERSION");
pub const LIBTORCH_VERSION: &str = env!("DISTILLERY_LIBTORCH_VERSION");
pub const DISTILLERY_VERSION: &str = env!("CARGO_PKG_VERSION");

/// One finished stage invocation.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct CommandRecord {
    pub stage: String,
    /// argv as given, program first.
    pub argv: Vec<String>,
    pub cwd: String,
    /// Start time, seconds since the Unix epoch.
    pub started: f64,
    pub seconds: f64,
    pub ok: bool,
    pub distillery: String,
    pub tch: String,
    pub libtorch: String,
}

impl CommandRecord {
    pub fn new(stage: &str, started: std::time::SystemTime, ok: bool) -> Self {
        let since = |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        CommandRecord {
            stage: stage.to_string(),
            argv: std::env::args().collect(),
            cwd: std::env::current_dir().map(|d| d.display().to_string()).unwrap_or_default(),
            started: since(started),
            seconds: since(std::time::SystemTime::now()) - since(started),
            ok,
            distillery: DISTILLERY_VERSION.into(),
            tch: TCH_VERSION.into(),
            libtorch: LIBTORCH_VERSION.into(),
        }
    }
}

/// Appends `rec` to the log named by `KD_COMMAND_LOG`, if any. One `write` of one line on a
/// file opened for appending, so stages running in parallel do not interleave.
pub fn log_command(rec: &CommandRecord) -> Result<()> {
    let Some(path) = std::env::var_os(COMMAND_LOG_ENV).filter(|p| !p.is_empty()) else { return Ok(()) };
    let path = Path::new(&path);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut line = serde_json::to_string(rec)?;
    line.push('\n');
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).with_context(|| format!("opening {}", path.display()))?;
    f.write_all(line.as_bytes()).with_context(|| format!("appending to {}", path.display()))
}

/// Reads a command log; lines that fail to parse are an error naming the line.
pub fn read_command_log(path: &Path) -> Result<Vec<CommandRecord>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("{}:{}: not a command record", path.display(), i + 1)))
        .collect()
}
