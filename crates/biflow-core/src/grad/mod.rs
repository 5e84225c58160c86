//! Training gradients on the CPU, by hand: the same computations as the candle models and their
//! losses' `backward`, written as explicit passes over the fused kernels of [`crate::ops`] into
//! buffers kept from one batch to the next. Why: candle's autograd allocates a zero tensor and runs
//! an add for every gradient contribution and keeps its whole graph alive; on a 2-core CPU that
//! bookkeeping cost a quarter of a training step. Tests check every gradient against autograd.

mod flow;
mod layer;
mod reverse;

pub use flow::{NllGrad, NllOutput};
pub use reverse::{HostOutputs, ReverseGrad};
