//! File formats shared by every part of biflow.

pub mod atomic;
pub mod npy;
pub mod pickle;
pub mod tensors;
