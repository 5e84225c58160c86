//! How the ops of this thread run: the fused CPU kernels or their composed references, and the dtype
//! of matrix products. A job sets it once for its own thread (the one that builds and differentiates
//! the graph); tests use it to run the composed path, which is what a GPU runs, on the CPU.

use std::cell::Cell;

use anyhow::Result;
use candle_core::{DType, Tensor};

use crate::device::Precision;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode {
    /// Use the fused kernels where the data allows (CPU, f32).
    pub fused: bool,
    /// Matrix products run in this dtype (inputs cast, result cast back); None: in the inputs' own.
    pub matmul: Option<DType>,
}

thread_local! {
    static MODE: Cell<Mode> = const { Cell::new(Mode { fused: true, matmul: None }) };
}

/// The mode of this thread.
pub fn current() -> Mode {
    MODE.with(Cell::get)
}

/// Restores the previous mode when dropped.
#[must_use = "the mode lasts as long as the guard"]
pub struct ModeGuard(Mode);

impl Drop for ModeGuard {
    fn drop(&mut self) {
        MODE.with(|m| m.set(self.0));
    }
}

fn enter(mode: Mode) -> ModeGuard {
    ModeGuard(MODE.with(|m| m.replace(mode)))
}

/// Run the composed references instead of the fused kernels (the path a GPU takes).
pub fn composed() -> ModeGuard {
    enter(Mode { fused: false, ..current() })
}

/// Matrix products in the precision's dtype (f32: as the data comes, so f64 checks stay f64).
pub fn precision(p: Precision) -> ModeGuard {
    let matmul = match p {
        Precision::F32 => None,
        Precision::Bf16 => Some(DType::BF16),
    };
    enter(Mode { matmul, ..current() })
}

/// a @ b in this thread's matmul dtype, returned in a's dtype.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    match current().matmul {
        Some(dt) if dt != a.dtype() => Ok(a.to_dtype(dt)?.matmul(&b.to_dtype(dt)?)?.to_dtype(a.dtype())?),
        _ => Ok(a.matmul(b)?),
    }
}

/// How a job's models run, chosen once per job: the CPU's fused kernels and hand-written passes, or
/// the composed candle ops with autograd (other devices, and the composed mode the tests use).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Fused,
    Composed,
}

impl Backend {
    /// The backend for models on `device`, in this thread's mode.
    pub fn of(device: &candle_core::Device) -> Backend {
        if device.is_cpu() && current().fused {
            Backend::Fused
        } else {
            Backend::Composed
        }
    }
}
