//! Atomic output: every file is written under a temporary name and renamed into place, so an
//! interrupted or failed stage never leaves a half-written output behind.
use anyhow::{Context, Result};
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};

fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Runs `write` on a temporary path next to `path`, then renames it to `path`. On error the
/// temporary file is removed and `path` is untouched.
pub fn write_via_temp<F>(path: &Path, write: F) -> Result<()>
where
    F: FnOnce(&Path) -> Result<()>,
{
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let tmp = temp_path(path);
    match write(&tmp) {
        Ok(()) => std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display())),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_via_temp(path, |tmp| {
        let mut f = std::fs::File::create(tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        Ok(())
    })
}

pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

/// Fills a directory through a staging folder inside it: `fill` writes into the staging
/// folder, then each file is renamed into `dir`. A failure removes the staging folder, and
/// `dir` too if this call created it, so nothing half-made is left behind.
pub fn atomic_dir<F>(dir: &Path, fill: F) -> Result<()>
where
    F: FnOnce(&Path) -> Result<()>,
{
    let created = !dir.exists();
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let staging = dir.join(format!(".staging-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)?;
    let result = fill(&staging).and_then(|()| {
        for entry in std::fs::read_dir(&staging)? {
            let entry = entry?;
            std::fs::rename(entry.path(), dir.join(entry.file_name()))?;
        }
        Ok(())
    });
    let _ = std::fs::remove_dir_all(&staging);
    if result.is_err() && created {
        let _ = std::fs::remove_dir_all(dir);
    }
    result
}

/// Total size of the files in a directory (a checkpoint's bytes on disk).
pub fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| entries.flatten().filter_map(|e| e.metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum())
        .unwrap_or(0)
}

/// Total size of the given files.
pub fn files_bytes(files: &[PathBuf]) -> u64 {
    files.iter().filter_map(|w| std::fs::metadata(w).ok()).map(|m| m.len()).sum()
}

/// FNV-1a, 64 bits: a checksum for journal parts and input fingerprints (torn or swapped
/// files, not adversaries).
pub fn fnv64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Identity of an input file for a journal: its size and checksum.
pub fn file_fingerprint(path: &Path) -> Result<serde_json::Value> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(serde_json::json!({"path": path.display().to_string(), "bytes": bytes.len(), "fnv64": format!("{:016x}", fnv64(&bytes))}))
}

/// Makes renames inside `dir` durable (a rename is only on disk once its directory is).
pub fn sync_dir(dir: &Path) -> Result<()> {
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    std::fs::File::open(dir).and_then(|f| f.sync_all()).with_context(|| format!("syncing {}", dir.display()))
}

/// Bytes free for this user on the file system that holds `path` (or its nearest existing
/// ancestor).
pub fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let mut p = path;
    while !p.exists() {
        p = p.parent().filter(|q| !q.as_os_str().is_empty()).unwrap_or(Path::new("."));
    }
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).ok()?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs fills the struct it is given for a valid C string.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return None;
    }
    Some(s.f_bavail as u64 * s.f_frsize as u64)
}

/// Fails before a write of about `needed` bytes into `dir` that cannot fit.
pub fn ensure_space(dir: &Path, needed: u64, what: &str) -> Result<()> {
    if let Some(free) = free_bytes(dir) {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        anyhow::ensure!(
            free >= needed,
            "not enough free space in {} for {what}: it needs about {:.1} MiB, {:.1} MiB are free",
            dir.display(),
            mib(needed),
            mib(free)
        );
    }
    Ok(())
}
