//! Device and precision selection shared by every stage (`--device`, `--dtype`).
use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

/// Whether autograd records operations on this thread (libtorch's grad mode, which
/// `tch::no_grad` turns off). tch keeps its own query private, so this asks libtorch.
pub fn grad_enabled() -> bool {
    // SAFETY: `at_grad_set_enabled` sets the thread's grad mode and returns the previous one;
    // the second call puts back what the first found. No tensor is touched.
    unsafe {
        let was = torch_sys::at_grad_set_enabled(0);
        torch_sys::at_grad_set_enabled(was);
        was != 0
    }
}

/// Whether autograd would record an operation on these tensors: grad mode is on and one of
/// them requires a gradient.
pub fn autograd_records(tensors: &[&Tensor]) -> bool {
    tensors.iter().any(|t| t.requires_grad()) && grad_enabled()
}

/// Adds `g` to `param`'s gradient (in place once it exists; the first time through autograd,
/// which is the only way to create a gradient through this binding: d/dp sum(p * g) = g).
/// A `g` of another dtype (a bf16 compute copy's gradient into its fp32 master) is added in
/// slices: on the CPU a mixed-dtype add converts its whole operand first, which for a model's
/// embedding table is a 100+ MiB fp32 transient. The sums are the same either way.
pub fn add_to_grad(param: &Tensor, g: &Tensor) {
    const SLICE: i64 = 1 << 22;
    let mut grad = param.grad();
    if grad.defined() {
        tch::no_grad(|| {
            if grad.kind() == g.kind() || !grad.is_contiguous() || !g.is_contiguous() || grad.size() != g.size() {
                let _ = grad.g_add_(&g.to_kind(grad.kind()));
                return;
            }
            let (dst, src) = (grad.view([-1]), g.view([-1]));
            let n = src.size()[0];
            for start in (0..n).step_by(SLICE as usize) {
                let len = SLICE.min(n - start);
                let _ = dst.narrow(0, start, len).g_add_(&src.narrow(0, start, len));
            }
        });
    } else {
        (param * g.to_kind(param.kind()).detach()).sum(Kind::Float).backward();
    }
}

/// `auto` takes CUDA when present, else the CPU; `cuda:N` picks a GPU.
pub fn parse_device(s: &str) -> Result<Device> {
    Ok(match s {
        "auto" => {
            if nvidia_driver_present() && load_cuda().is_ok() {
                Device::cuda_if_available()
            } else {
                Device::Cpu
            }
        }
        "cpu" => Device::Cpu,
        s if s == "cuda" || s.starts_with("cuda:") => {
            let n: usize = match s.strip_prefix("cuda:") {
                Some(i) => i.parse().map_err(|_| anyhow::anyhow!("--device: bad GPU index in `{s}`"))?,
                None => 0,
            };
            if let Err(why) = load_cuda() {
                bail!("--device {s}: libtorch's CUDA library cannot be loaded: {why}");
            }
            if !tch::Cuda::is_available() {
                bail!("--device {s}: no CUDA device is available");
            }
            if n >= tch::Cuda::device_count() as usize {
                bail!("--device {s}: only {} CUDA device(s)", tch::Cuda::device_count());
            }
            Device::Cuda(n)
        }
        other => bail!("--device must be auto, cpu, cuda or cuda:N, got `{other}`"),
    })
}

/// Whether an NVIDIA driver is installed: without one no CUDA device can exist, so `auto`
/// need not load libtorch's CUDA half to find out.
fn nvidia_driver_present() -> bool {
    std::path::Path::new("/proc/driver/nvidia/version").exists() || std::path::Path::new("/dev/nvidiactl").exists()
}

/// Loads `libtorch_cuda.so` (and through it cuBLAS, cuDNN and the other CUDA libraries) the
/// first time a GPU is asked for. The binaries do not link it: its loading alone made a CPU
/// run's resident memory 235 MiB larger and its start slower. It is the one beside the
/// `libtorch_cpu.so` this process runs on, loaded with global symbols, as Python's `torch`
/// loads it. It must be loaded before libtorch is asked anything about CUDA (`manual_seed`
/// does ask): libtorch settles on "no CUDA" at the first question and keeps that answer.
pub fn load_cuda() -> std::result::Result<(), String> {
    static LOADED: std::sync::OnceLock<std::result::Result<(), String>> = std::sync::OnceLock::new();
    LOADED.get_or_init(|| {
        let maps = std::fs::read_to_string("/proc/self/maps").map_err(|e| format!("reading /proc/self/maps: {e}"))?;
        let cpu_lib = maps
            .lines()
            // The path is the rest of the line from its first `/` (it may hold spaces).
            .filter_map(|l| l.find('/').map(|i| l[i..].trim_end()))
            .find(|path| path.ends_with("/libtorch_cpu.so"))
            .ok_or("libtorch_cpu.so is not among this process's libraries")?;
        let cuda_lib = std::path::Path::new(cpu_lib).with_file_name("libtorch_cuda.so");
        if !cuda_lib.is_file() {
            return Err(format!("{} does not exist (a CPU-only libtorch)", cuda_lib.display()));
        }
        let c_path = std::ffi::CString::new(cuda_lib.to_string_lossy().as_bytes()).map_err(|e| e.to_string())?;
        // SAFETY: dlopen with a valid C string; the handle is kept (never closed) for the
        // process's life, as libtorch's registrations in it must stay valid.
        let handle = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        if handle.is_null() {
            // SAFETY: dlerror returns a thread-local C string describing the failure, or null.
            let why = unsafe {
                let e = libc::dlerror();
                if e.is_null() { "unknown error".to_string() } else { std::ffi::CStr::from_ptr(e).to_string_lossy().into_owned() }
            };
            return Err(format!("{}: {why}", cuda_lib.display()));
        }
        Ok(())
    })
    .clone()
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

/// Resolves `--device` and `--dtype` together.
pub fn device_and_kind(device: &str, dtype: &str) -> Result<(Device, Kind)> {
    let d = parse_device(device)?;
    Ok((d, parse_dtype(dtype, d)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loaded late, libtorch's CUDA half still registers itself: on a machine without a GPU,
    /// a CUDA tensor then fails for want of a driver or device, not for want of the library
    /// ("Cannot initialize CUDA without ATen_cuda library", or no CUDA kernel for `empty`).
    #[test]
    fn cuda_loaded_on_demand_registers_with_libtorch() {
        let before = std::fs::read_to_string("/proc/self/maps").unwrap();
        assert!(!before.contains("libtorch_cuda.so"), "libtorch_cuda.so is linked: it should load on demand");
        if let Err(why) = load_cuda() {
            eprintln!("skipped: {why}");
            return;
        }
        assert!(std::fs::read_to_string("/proc/self/maps").unwrap().contains("libtorch_cuda.so"));
        match tch::Tensor::f_zeros([2], (Kind::Float, Device::Cuda(0))) {
            Ok(t) => assert_eq!(t.device(), Device::Cuda(0)),
            Err(e) => {
                let msg = e.to_string();
                eprintln!("{}", msg.lines().next().unwrap_or(""));
                assert!(!msg.contains("ATen_cuda") && !msg.contains("Could not run"), "CUDA is not registered: {msg}");
            }
        }
    }
}
