//! Training gradients on the CPU, by hand: the same computations as the candle models and their
//! losses' `backward`, written as explicit passes over the fused kernels of [`crate::engines::ops`] into
//! buffers kept from one batch to the next. Why: candle's autograd allocates a zero tensor and runs
//! an add for every gradient contribution and keeps its whole graph alive; on a 2-core CPU that
//! bookkeeping cost a quarter of a training step. Tests check every gradient against autograd.

mod decode;
mod flow;
mod layer;
pub mod ops;
mod reverse;

pub(crate) use decode::{BlockDecoder, HostBlock, HostLayer, HostLinear, HostNorm};
pub(crate) use flow::BlockParams;
pub(crate) use layer::{LayerParams, Pair, Places};
pub(crate) use reverse::ReverseParams;

pub use flow::{NllGrad, NllOutput};
pub use reverse::{HostOutputs, ReverseGrad};

use std::sync::OnceLock;

use anyhow::Result;
use candle_core::DType;


/// A model's constant weights on the host, laid out for its hand-written pass (`engine`).
pub(crate) struct Frozen<E> {
    pub engine: E,
    values: Vec<Vec<f32>>,
}

impl<E> Frozen<E> {
    pub fn params(&self) -> Vec<&[f32]> {
        self.values.iter().map(Vec::as_slice).collect()
    }

    /// The hand-written pass of a model, made on first use and kept in `cell`, where it applies:
    /// f32 weights on the CPU that are constants (a loaded model: trainable variables take candle's
    /// graph), on the fused path. `make` builds the engine from the names and sizes and lays the
    /// values out for it.
    pub fn get_or_make<'a>(
        cell: &'a OnceLock<Option<Frozen<E>>>,
        named: impl FnOnce() -> Vec<(String, candle_core::Tensor)>,
        make: impl FnOnce(&[String], &[usize], &mut [Vec<f32>]) -> Result<E>,
    ) -> Result<Option<&'a Frozen<E>>> {
        if !crate::device::mode::current().fused {
            return Ok(None);
        }
        if cell.get().is_none() {
            let named = named();
            let applies = named.iter().all(|(_, t)| t.device().is_cpu() && t.dtype() == DType::F32 && !t.is_variable());
            let frozen = if applies {
                let names: Vec<String> = named.iter().map(|(n, _)| n.clone()).collect();
                let mut values = named.iter().map(|(_, t)| Ok(t.flatten_all()?.to_vec1::<f32>()?)).collect::<Result<Vec<_>>>()?;
                let sizes: Vec<usize> = values.iter().map(Vec::len).collect();
                Some(Frozen { engine: make(&names, &sizes, &mut values)?, values })
            } else {
                None
            };
            let _ = cell.set(frozen);
        }
        Ok(cell.get().and_then(Option::as_ref))
    }
}

/// The largest |a - b| over two equally long slices; NaN if any difference is NaN (`f32::max` would
/// drop it, and the tests fill outputs with NaN to catch what a pass leaves unwritten).
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "the compared values differ in length");
    a.iter().zip(b).map(|(a, b)| (a - b).abs()).fold(0f32, |m, d| if m.is_nan() || d.is_nan() { f32::NAN } else { m.max(d) })
}
