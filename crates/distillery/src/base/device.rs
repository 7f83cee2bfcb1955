//! Device and precision selection shared by every stage (`--device`, `--dtype`).
use anyhow::{bail, Result};
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

/// Resolves `--device` and `--dtype` together.
pub fn device_and_kind(device: &str, dtype: &str) -> Result<(Device, Kind)> {
    let d = parse_device(device)?;
    Ok((d, parse_dtype(dtype, d)?))
}
