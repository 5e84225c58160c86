//! The offline judge: a small CNN classifier trained on a prepared, labelled dataset, whose
//! penultimate features are the yardstick of `eval-quality` (Frechet distance FD_J, k-NN precision
//! and recall, within-class diversity) and whose predictions give the label accuracy of conditional
//! samples. Inception FID needs weights that cannot be fetched offline; this needs none.
//!
//! The judge is a yardstick only: nothing trains F or G against it (a loss in its features would
//! make its numbers meaningless).
//!
//! ```text
//! J/judge.json            kind, configuration, held-out accuracy and the floor below which it is refused
//! J/weights.safetensors   conv1..conv3, features, head
//! ```

pub mod metrics;
pub mod net;
pub mod quality;
pub mod train;

pub use net::{Judge, JudgeConfig, JudgeFile};
