//! The models, as the paper writes them: candle modules built from a VarBuilder with a `forward`.
//! F is the TARFlow forward flow (maximum likelihood, exact causal inverse); G is BiFlow's learned
//! reverse model with its training losses; LPIPS (VGG16) and ConvNeXt-V2 are the frozen networks of
//! its perceptual losses. The CPU engines that run them fast live in
//! [`crate::engines`] and [`crate::engines::ops`].

pub mod convnext;
pub mod flow;
pub mod params;
pub mod layers;
pub mod lpips;
pub mod perceptual;
pub mod reverse;
pub mod vae;
