//! Stop requests from the outside world. Clusters preempt jobs with SIGTERM, SLURM warns with
//! SIGUSR1 before the time limit, and people press Ctrl-C; a training run should answer by
//! finishing its optimizer step, saving, and exiting with [`EXIT_STOPPED`] so that a job
//! script can requeue it with `--resume`.
//!
//! The handlers only count signals (atomics) and, for a second signal, `_exit` at once: both
//! are async-signal-safe. The trainer polls [`stop_requested`] between optimizer steps.
use anyhow::{bail, Result};
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};

/// Exit status of a run stopped by a signal after saving its state: EX_TEMPFAIL from
/// sysexits.h ("try again later"), distinct from success (0), errors (1) and death by a signal
/// (128 + n).
pub const EXIT_STOPPED: i32 = 75;

/// A signal that can request a stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopSignal {
    Term,
    Int,
    Usr1,
    Usr2,
    Hup,
}

impl StopSignal {
    pub fn number(self) -> i32 {
        match self {
            StopSignal::Term => libc::SIGTERM,
            StopSignal::Int => libc::SIGINT,
            StopSignal::Usr1 => libc::SIGUSR1,
            StopSignal::Usr2 => libc::SIGUSR2,
            StopSignal::Hup => libc::SIGHUP,
        }
    }
}

impl std::str::FromStr for StopSignal {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<StopSignal> {
        let name = s.trim().to_ascii_uppercase();
        Ok(match name.strip_prefix("SIG").unwrap_or(&name) {
            "TERM" => StopSignal::Term,
            "INT" => StopSignal::Int,
            "USR1" => StopSignal::Usr1,
            "USR2" => StopSignal::Usr2,
            "HUP" => StopSignal::Hup,
            _ => bail!("unknown stop signal `{s}` (TERM, INT, USR1, USR2 or HUP)"),
        })
    }
}

/// The name of a signal number, for messages.
pub fn signal_name(n: i32) -> String {
    match n {
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGINT => "SIGINT".into(),
        libc::SIGUSR1 => "SIGUSR1".into(),
        libc::SIGUSR2 => "SIGUSR2".into(),
        libc::SIGHUP => "SIGHUP".into(),
        n => format!("signal {n}"),
    }
}

static FIRST: AtomicI32 = AtomicI32::new(0);
static COUNT: AtomicUsize = AtomicUsize::new(0);

/// What a second signal does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnSecond {
    /// Exit at once with 128 + n: whatever was committed last stays on disk.
    Abort,
    /// Only count it; the caller acts on [`received`] (kd-chain forwards it to its child).
    Count,
}

/// Installs the handlers. Call once, early in `main`.
pub fn install(signals: &[StopSignal], on_second: OnSecond) -> Result<()> {
    for s in signals {
        let n = s.number();
        let action = move || {
            if COUNT.fetch_add(1, Ordering::SeqCst) == 0 {
                FIRST.store(n, Ordering::SeqCst);
            } else if on_second == OnSecond::Abort {
                const MSG: &[u8] = b"second stop signal: aborting at once; the last committed state is kept\n";
                // SAFETY: write(2) and _exit(2) are async-signal-safe.
                unsafe { libc::write(2, MSG.as_ptr().cast(), MSG.len()) };
                signal_hook::low_level::exit(128 + n);
            }
        };
        // SAFETY: the action touches only atomics, write(2) and _exit(2).
        unsafe { signal_hook::low_level::register(n, action) }.map_err(|e| anyhow::anyhow!("installing a handler for {}: {e}", signal_name(n)))?;
    }
    Ok(())
}

/// The first stop signal received, if any.
pub fn stop_requested() -> Option<i32> {
    match FIRST.load(Ordering::SeqCst) {
        0 => None,
        n => Some(n),
    }
}

/// How many stop signals arrived so far.
pub fn received() -> usize {
    COUNT.load(Ordering::SeqCst)
}

/// The error of a run that stopped on request after saving what it had: the binaries exit
/// with [`EXIT_STOPPED`] and print the message (which says where the state is).
#[derive(Debug)]
pub struct Stopped {
    pub signal: i32,
    pub message: String,
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Stopped {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_names_parse_with_or_without_sig() {
        assert_eq!("TERM".parse::<StopSignal>().unwrap(), StopSignal::Term);
        assert_eq!("sigusr1".parse::<StopSignal>().unwrap(), StopSignal::Usr1);
        assert!("KILL".parse::<StopSignal>().unwrap_err().to_string().contains("unknown stop signal"));
    }
}
