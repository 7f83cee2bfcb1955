//! One writer per output: a stage holds `<out>.lock` (an flock(2) lock) while it writes
//! `--out`, so a second process started on the same output is refused instead of
//! interleaving checkpoints or journal parts with the first. The kernel drops the lock when
//! its holder dies, so a file left by a crash is taken over by the next run.
use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// The lock file of an output (file or directory): a sibling named `<out>.lock`.
pub fn lock_path(out: &Path) -> PathBuf {
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    out.with_file_name(format!("{name}.lock"))
}

/// Held while alive; the lock file is removed on drop.
#[derive(Debug)]
pub struct OutputLock {
    path: PathBuf,
    _file: File,
}

impl OutputLock {
    /// Takes the lock of `out`, or fails naming the process that holds it.
    pub fn acquire(out: &Path) -> Result<OutputLock> {
        let path = lock_path(out);
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        loop {
            let mut file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(&path)
                .with_context(|| format!("opening the lock file {}", path.display()))?;
            // SAFETY: flock on a file descriptor this function owns.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                let err = std::io::Error::last_os_error();
                if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                    let mut holder = String::new();
                    let _ = file.read_to_string(&mut holder);
                    let holder = holder.trim();
                    let who = if holder.is_empty() { String::new() } else { format!(" (pid {holder})") };
                    bail!(
                        "{} is being written by another process{who}: only one run may write an output at a time \
                         (lock file {}); wait for it to end or choose another --out",
                        out.display(),
                        path.display()
                    );
                }
                return Err(err).with_context(|| format!("locking {}", path.display()));
            }
            // The previous holder may have removed the file between our open and our lock;
            // then the lock is on an orphaned inode and the path must be opened again.
            let same = match std::fs::metadata(&path) {
                Ok(m) => m.ino() == file.metadata()?.ino(),
                Err(_) => false,
            };
            if !same {
                continue;
            }
            file.set_len(0)?;
            file.rewind()?;
            writeln!(file, "{}", std::process::id())?;
            return Ok(OutputLock { path, _file: file });
        }
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Removed while still locked, so no other process can have taken this inode.
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_until_the_first_drops() {
        let dir = std::env::temp_dir().join(format!("distillery-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("out.jsonl");
        let first = OutputLock::acquire(&out).unwrap();
        // flock locks belong to open file descriptions: a second open in this process conflicts too.
        let err = OutputLock::acquire(&out).unwrap_err().to_string();
        assert!(err.contains("being written by another process"), "{err}");
        assert!(err.contains(&format!("pid {}", std::process::id())), "{err}");
        drop(first);
        assert!(!lock_path(&out).exists());
        let again = OutputLock::acquire(&out).unwrap();
        drop(again);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
