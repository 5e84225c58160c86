//! Evaluation: pytorch-compatible FID, bits/dim, the learned inverse against the exact one
//! (eval-reverse), and the offline judge of sample quality.

pub mod bpd;
pub mod fid;
pub mod judge;
pub mod lpips;
pub mod reverse;
