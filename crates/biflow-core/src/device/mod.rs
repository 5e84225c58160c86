//! Where the maths runs: `--device auto|cpu|cuda|cuda:N`, `--precision f32|bf16`, and what this build
//! and machine offer (`biflow doctor`).
//!
//! Every job takes the same two options, so a request that cannot be met (CUDA on a CPU-only build, no
//! GPU, an ordinal out of range, bf16 on the CPU) fails before the job reads or writes anything.

use std::fmt;

use anyhow::{bail, Result};
use candle_core::Device;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

pub mod mode;

use mode::ModeGuard;

/// What the user asked for with `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRequest {
    /// The first GPU when the build has CUDA and one is present, else the CPU.
    Auto,
    Cpu,
    Cuda(usize),
}

impl DeviceRequest {
    pub fn parse(s: &str) -> Result<DeviceRequest> {
        Ok(match s.trim() {
            "" | "auto" => DeviceRequest::Auto,
            "cpu" => DeviceRequest::Cpu,
            "cuda" | "gpu" => DeviceRequest::Cuda(0),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => DeviceRequest::Cuda(n),
                _ => {
                    bail!("--device {other:?}: expected auto, cpu, cuda or cuda:N (N = 0, 1, ...)")
                }
            },
        })
    }
}

/// The arithmetic of matrix products: f32 throughout, or bf16 products with f32 accumulation, master
/// weights, optimizer state and reductions (CUDA only: the CPU kernels are f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

impl Precision {
    pub fn parse(s: &str) -> Result<Precision> {
        match s.trim() {
            "" | "f32" | "fp32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            other => bail!("--precision {other:?}: expected f32 or bf16"),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        })
    }
}

/// Whether this build has the CUDA backend.
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

const NO_CUDA_BUILD: &str = "this biflow was built without CUDA. Build it with the cuda feature \
     (BIFLOW_CUDA=1 npm ci, or npm run build:cuda; README, section CUDA), or use --device cpu";

/// The CUDA devices this machine has, by name (empty on a CPU-only build or without a driver/GPU).
pub fn cuda_devices() -> Vec<String> {
    cuda::devices().unwrap_or_default()
}

/// The device for `--device` (None means auto).
pub fn select(request: Option<&str>) -> Result<Device> {
    let request = DeviceRequest::parse(request.unwrap_or("auto"))?;
    match request {
        DeviceRequest::Cpu => Ok(Device::Cpu),
        DeviceRequest::Auto => {
            if CUDA_BUILT && !cuda_devices().is_empty() {
                open_cuda(0)
            } else {
                Ok(Device::Cpu)
            }
        }
        DeviceRequest::Cuda(n) => {
            if !CUDA_BUILT {
                bail!("--device cuda: {NO_CUDA_BUILD}");
            }
            let devices = match cuda::devices() {
                Ok(d) => d,
                Err(e) => bail!("--device cuda: the CUDA driver cannot be used ({e}); is an NVIDIA GPU and its driver present? Use --device cpu"),
            };
            match devices.len() {
                0 => bail!(
                    "--device cuda: no CUDA device was found on this machine; use --device cpu"
                ),
                count if n >= count => bail!(
                    "--device cuda:{n}: this machine has {count} CUDA device{} (cuda:0{})",
                    if count == 1 { "" } else { "s" },
                    if count == 1 {
                        String::new()
                    } else {
                        format!(" to cuda:{}", count - 1)
                    }
                ),
                _ => open_cuda(n),
            }
        }
    }
}

fn open_cuda(n: usize) -> Result<Device> {
    Device::new_cuda(n).map_err(|e| anyhow::anyhow!("cannot open CUDA device cuda:{n}: {e}"))
}

/// Check `--precision` against the device: bf16 runs on CUDA only.
pub fn check_precision(precision: Precision, device: &Device) -> Result<()> {
    if precision == Precision::Bf16 && !device.is_cuda() {
        bail!("--precision bf16 runs on CUDA only (the CPU kernels are f32); use --precision f32, or --device cuda on a CUDA build");
    }
    Ok(())
}

/// Where a job runs: its device and precision. Holding it keeps this thread's ops in the precision
/// (see device::mode); a job takes it first, so a request that cannot be met fails before any work.
pub struct Placement {
    pub device: Device,
    _mode: ModeGuard,
}

/// The placement for a job's `device` and `precision` options (auto and f32 when absent).
pub fn place(device: Option<&str>, precision: Option<&str>) -> Result<Placement> {
    let device = select(device)?;
    let precision = Precision::parse(precision.unwrap_or("f32"))?;
    check_precision(precision, &device)?;
    Ok(Placement {
        device,
        _mode: crate::device::mode::precision(precision),
    })
}

/// A short name for reports: "cpu" or "cuda:N".
pub fn describe(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => match device.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            _ => "cuda".into(),
        },
        _ => format!("{:?}", device.location()),
    }
}

/// What `biflow doctor` prints: the build's features, the devices seen, thread counts, CPU features.
pub fn doctor() -> Value {
    let cuda = match cuda::devices() {
        Ok(d) => json!({ "built": CUDA_BUILT, "devices": d }),
        Err(e) => json!({ "built": CUDA_BUILT, "devices": [], "error": e }),
    };
    #[cfg(target_arch = "x86_64")]
    let cpu = json!({
        "avx2": std::is_x86_feature_detected!("avx2"),
        "fma": std::is_x86_feature_detected!("fma"),
        "avx512f": std::is_x86_feature_detected!("avx512f"),
    });
    #[cfg(not(target_arch = "x86_64"))]
    let cpu = json!({});
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "features": if CUDA_BUILT { vec!["cuda"] } else { Vec::<&str>::new() },
        "cuda": cuda,
        "threads": rayon::current_num_threads(),
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "cpu": cpu,
        "kernels": crate::engines::ops::kernels(),
        "defaultDevice": select(None).map(|d| describe(&d)).unwrap_or_else(|_| "cpu".into()),
    })
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::CudaContext;

    pub fn devices() -> Result<Vec<String>, String> {
        let count = CudaContext::device_count().map_err(|e| e.to_string())?;
        (0..count as usize)
            .map(|i| {
                CudaContext::new(i)
                    .and_then(|c| c.name())
                    .map_err(|e| e.to_string())
            })
            .collect()
    }
}

#[cfg(not(feature = "cuda"))]
mod cuda {
    pub fn devices() -> Result<Vec<String>, String> {
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_bad_ones_are_clear() {
        assert_eq!(DeviceRequest::parse("auto").unwrap(), DeviceRequest::Auto);
        assert_eq!(DeviceRequest::parse("cpu").unwrap(), DeviceRequest::Cpu);
        assert_eq!(
            DeviceRequest::parse("cuda").unwrap(),
            DeviceRequest::Cuda(0)
        );
        assert_eq!(
            DeviceRequest::parse("cuda:3").unwrap(),
            DeviceRequest::Cuda(3)
        );
        for bad in ["cuda:", "cuda:x", "tpu", "cuda:-1"] {
            let e = DeviceRequest::parse(bad).unwrap_err().to_string();
            assert!(e.contains("expected auto, cpu, cuda or cuda:N"), "{e}");
        }
        assert!(Precision::parse("fp16").is_err());
    }

    #[test]
    fn cpu_only_requests_fail_clearly() {
        assert!(select(Some("cpu")).unwrap().is_cpu());
        if !CUDA_BUILT {
            assert!(select(None).unwrap().is_cpu());
            let e = select(Some("cuda:0")).unwrap_err().to_string();
            assert!(
                e.contains("built without CUDA") && e.contains("--device cpu"),
                "{e}"
            );
        } else if cuda_devices().is_empty() {
            let e = select(Some("cuda")).unwrap_err().to_string();
            assert!(e.contains("--device cpu"), "{e}");
        }
        let e = select(Some("cuda:99")).unwrap_err().to_string();
        assert!(e.contains("cuda"), "{e}");
        let e = check_precision(Precision::Bf16, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("CUDA only"), "{e}");
    }
}
