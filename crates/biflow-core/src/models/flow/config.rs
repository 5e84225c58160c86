//! F's configuration: the shape of a TARFlow and the constants the reference fixes.

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};

/// Attention head size, fixed by the reference.
pub const HEAD_DIM: usize = 64;
/// MLP expansion factor, fixed by the reference.
pub const MLP_EXPANSION: usize = 4;
/// LayerNorm epsilon (PyTorch's default).
pub const LN_EPS: f64 = 1e-5;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FlowConfig {
    pub img_size: usize,
    pub in_channels: usize,
    pub patch_size: usize,
    pub channels: usize,
    pub num_blocks: usize,
    pub layers_per_block: usize,
    /// Number of classes; 0 = unconditional.
    #[serde(default)]
    pub num_classes: usize,
    /// Soft clip `c * tanh(a / c)` of the log-scales a (BiFlow's forward-side norm control); None = off.
    #[serde(default)]
    pub clip_scale: Option<f64>,
}

impl FlowConfig {
    /// The configuration of ml-tarflow's `Model(...)` from its keyword arguments (snake_case JSON,
    /// as the reference fixtures record them; other keys are ignored).
    pub fn from_reference_args(args: &serde_json::Value) -> Result<FlowConfig> {
        #[derive(Deserialize)]
        struct Args {
            img_size: usize,
            in_channels: usize,
            patch_size: usize,
            channels: usize,
            num_blocks: usize,
            layers_per_block: usize,
            #[serde(default)]
            num_classes: usize,
        }
        let a: Args = serde_json::from_value(args.clone()).context("the reference model's arguments")?;
        let Args { img_size, in_channels, patch_size, channels, num_blocks, layers_per_block, num_classes } = a;
        Ok(FlowConfig { img_size, in_channels, patch_size, channels, num_blocks, layers_per_block, num_classes, clip_scale: None })
    }

    /// T: the number of patch tokens.
    pub fn num_tokens(&self) -> usize {
        let s = self.img_size / self.patch_size.max(1);
        s * s
    }
    /// D: the size of one token.
    pub fn token_dim(&self) -> usize {
        self.in_channels * self.patch_size * self.patch_size
    }
    /// C*H*W: the number of dimensions of one image.
    pub fn image_dim(&self) -> usize {
        self.in_channels * self.img_size * self.img_size
    }
    pub fn num_heads(&self) -> usize {
        self.channels / HEAD_DIM
    }
    /// Check that the numbers make a model.
    pub fn validate(&self) -> Result<()> {
        ensure!(self.img_size > 0 && self.in_channels > 0, "image size and channels must be positive");
        ensure!(self.patch_size > 0, "patch size must be positive");
        ensure!(
            self.img_size % self.patch_size == 0,
            "image size {} is not a multiple of the patch size {}",
            self.img_size,
            self.patch_size
        );
        ensure!(self.num_tokens() >= 2, "the model needs at least 2 tokens (image size / patch size >= 2)");
        ensure!(
            self.channels > 0 && self.channels % HEAD_DIM == 0,
            "channels ({}) must be a positive multiple of the head size {HEAD_DIM}",
            self.channels
        );
        ensure!(self.num_blocks > 0, "the model needs at least one block");
        ensure!(self.layers_per_block > 0, "each block needs at least one layer");
        if let Some(c) = self.clip_scale {
            ensure!(c.is_finite() && c > 0.0, "clip scale must be a positive number, got {c}");
        }
        Ok(())
    }
}

/// The soft clip `c tanh(a / c)` of a log-scale, as the host passes compute it (the model's
/// [`super::FlowBlock`] applies the same to tensors).
pub fn soft_clip(a: f32, c: Option<f64>) -> f32 {
    match c {
        Some(c) => c as f32 * (a / c as f32).tanh(),
        None => a,
    }
}

/// d soft_clip / d a, from the clipped value: `1 - (clipped / c)^2`.
pub fn soft_clip_slope(clipped: f32, c: Option<f64>) -> f32 {
    match c {
        Some(c) => 1.0 - (clipped / c as f32).powi(2),
        None => 1.0,
    }
}
