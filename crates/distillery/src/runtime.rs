//! Device and precision selection shared by every stage (`--device`, `--dtype`), and
//! progress reporting on stderr.
use anyhow::{bail, Result};
use std::time::Instant;
use tch::{Device, Kind};

/// `auto` takes CUDA when present, else the CPU; `cuda:N` picks a GPU.
pub fn parse_device(s: &str) -> Result<Device> {
    Ok(match s {
        "auto" => Device::cuda_if_available(),
        "cpu" => Device::Cpu,
        "cuda" => {
            if !tch::Cuda::is_available() {
                bail!("--device cuda: no CUDA device is available");
            }
            Device::Cuda(0)
        }
        s if s.starts_with("cuda:") => {
            let n: usize = s[5..].parse().map_err(|_| anyhow::anyhow!("--device: bad GPU index in `{s}`"))?;
            if n >= tch::Cuda::device_count() as usize {
                bail!("--device {s}: only {} CUDA device(s)", tch::Cuda::device_count());
            }
            Device::Cuda(n)
        }
        other => bail!("--device must be auto, cpu, cuda or cuda:N, got `{other}`"),
    })
}

/// `auto` is fp32 on the CPU and bf16 on a GPU.
pub fn parse_dtype(s: &str, device: Device) -> Result<Kind> {
    Ok(match s {
        "auto" => {
            if device.is_cuda() {
                Kind::BFloat16
            } else {
                Kind::Float
            }
        }
        "f32" | "fp32" | "float32" => Kind::Float,
        "bf16" | "bfloat16" => Kind::BFloat16,
        "f16" | "fp16" | "float16" => Kind::Half,
        other => bail!("--dtype must be auto, f32, bf16 or f16, got `{other}`"),
    })
}

pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(n) => format!("cuda:{n}"),
        d => format!("{d:?}"),
    }
}

/// Progress on stderr: a bar with rate and time left on a terminal, a plain line every few
/// seconds otherwise (logs, CI).
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    label: String,
    total: u64,
    done: u64,
    start: Instant,
    last_line: Instant,
}

impl Progress {
    pub fn new(label: &str, total: u64) -> Progress {
        use std::io::IsTerminal;
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {per_sec} eta {eta} {msg}")
                    .unwrap()
                    .progress_chars("=> "),
            );
            bar.set_prefix(label.to_string());
            bar
        });
        Progress { bar, label: label.into(), total, done: 0, start: Instant::now(), last_line: Instant::now() }
    }

    pub fn inc(&mut self, n: u64, msg: &str) {
        self.done += n;
        if let Some(bar) = &self.bar {
            bar.set_message(msg.to_string());
            bar.inc(n);
        } else if self.last_line.elapsed().as_secs_f64() >= 10.0 || self.done == self.total {
            self.last_line = Instant::now();
            let secs = self.start.elapsed().as_secs_f64();
            let rate = self.done as f64 / secs.max(1e-9);
            let left = (self.total.saturating_sub(self.done)) as f64 / rate.max(1e-9);
            eprintln!("{}: {}/{} ({rate:.2}/s, {left:.0}s left) {msg}", self.label, self.done, self.total);
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// libtorch's CPU allocator takes every tensor from glibc malloc. With glibc's defaults,
/// blocks above a moving mmap threshold get fresh mappings and freed heap tops go back to
/// the OS, so each training step faults in and zeroes its large activations again: about a
/// fifth of a CPU distillation step in `perf`. A fixed threshold at glibc's ceiling (32 MiB)
/// and no trimming keep freed blocks for reuse; the process keeps its high-water mark until
/// it exits (fine for a pipeline stage, which is why only `cli::run` calls this).
pub fn tune_cpu_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before tensors exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
