//! The BiFlow distillation losses: hidden alignment (paper eq. 2) and the ablations of its tables,
//! plus training-time guidance (eq. 5). Every distance is a per-sample MSE in token space, weighted
//! adaptively `D / sg((D + eps)^p)` per sample before the batch mean.

use anyhow::{ensure, Result};
use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

use super::ReverseOutput;

/// What G's intermediate states are held to.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LossKind {
    /// Hidden alignment: heads phi_j(h_j) aligned with x^{B-j}, plus reconstruction.
    Align,
    /// Naive distillation: the end point only, D(x, x').
    Naive,
    /// Hidden distillation: G's states themselves (their first D channels) held to x^{B-j}, no heads.
    Hidden,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LossConfig {
    pub kind: LossKind,
    /// Reverse-side norm control: alignment targets scaled per sample to unit RMS.
    pub rms_norm: bool,
    /// The learned-denoising block: x' is held to the CLEAN x; without it, to the noisy x~.
    pub learned_denoise: bool,
    pub adaptive_p: f64,
    pub adaptive_eps: f64,
}

/// Extra distances on x' (perceptual losses on the images, `models::perceptual`), each added with
/// its weight after the same adaptive weighting as every term.
pub trait PerceptualTerms {
    /// Each term's per-sample distance (N) between predicted and target tokens (N, T, D).
    fn distances(&self, predicted: &Tensor, target: &Tensor) -> Result<Vec<WeightedDistance>>;
}

pub struct WeightedDistance {
    pub name: String,
    pub weight: f64,
    pub distance: Tensor,
}

/// The forward states G is distilled from.
pub struct Targets<'a> {
    /// x (N, T, D): the clean tokens.
    pub clean: &'a Tensor,
    /// x~ = x + sigma eps = x^0.
    pub noisy: &'a Tensor,
    /// x^1 .. x^B, F's block outputs (x^B = z).
    pub trajectory: &'a [Tensor],
}

/// The loss (a scalar to minimise) and its parts, unweighted batch means, for the logs.
pub struct LossValue {
    pub total: Tensor,
    pub parts: Vec<(String, f64)>,
}

/// Per-sample mean squared error over tokens and dimensions: (N, T, D) x2 -> (N).
fn mse(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok((a - b)?.sqr()?.flatten_from(1)?.mean(D::Minus1)?)
}

/// v / sqrt(mean(v^2) + 1e-6) per sample.
fn rms_normalise(v: &Tensor) -> Result<Tensor> {
    let rms = (v.sqr()?.flatten_from(1)?.mean_keepdim(D::Minus1)? + 1e-6)?.sqrt()?.unsqueeze(2)?;
    Ok(v.broadcast_div(&rms)?)
}

impl LossConfig {
    /// `D / sg((D + eps)^p)`: each sample's term scaled to about 1, so easy and hard samples (and
    /// terms) pull alike; p = 0 leaves D as it is.
    fn adaptive(&self, d: &Tensor) -> Result<Tensor> {
        if self.adaptive_p == 0.0 {
            return Ok(d.clone());
        }
        let w = (d.detach() + self.adaptive_eps)?.powf(self.adaptive_p)?;
        Ok((d / w)?)
    }

    fn align_target(&self, x: &Tensor) -> Result<Tensor> {
        if self.rms_norm {
            rms_normalise(x)
        } else {
            Ok(x.clone())
        }
    }

    /// The BiFlow loss of G's output `pred` (the conditional prediction, see
    /// [`implied_conditional`]) against the forward states.
    ///
    /// align: `sum_j D(n(x^{B-j}), phi_j(h_j)) + D(x, x')` (eq. 2); naive: `D(x, x')`; hidden:
    /// `sum_j D(n(x^{B-j}), h_j[..D]) + D(x, x')`. Against x~ instead of x without learned denoising.
    pub fn loss(&self, pred: &ReverseOutput, t: &Targets, perceptual: Option<&dyn PerceptualTerms>) -> Result<LossValue> {
        let b = t.trajectory.len();
        let stage_outputs: Vec<Tensor> = match self.kind {
            LossKind::Align => {
                ensure!(pred.heads.len() == b, "the hidden-alignment loss needs G's {b} heads, got {}", pred.heads.len());
                pred.heads.clone()
            }
            LossKind::Hidden => {
                ensure!(pred.states.len() == b, "the hidden-distillation loss needs G's {b} stage states, got {}", pred.states.len());
                let d = t.clean.dim(2)?;
                pred.states.iter().map(|h| h.narrow(2, 0, d)).collect::<candle_core::Result<_>>()?
            }
            LossKind::Naive => Vec::new(),
        };
        // Per-sample weighted terms (N each), and the unweighted batch means for the logs.
        let mut terms = Vec::new();
        let mut parts = Vec::new();
        let mut align_raw = 0.0;
        for (j, out) in stage_outputs.iter().enumerate() {
            // Stage j+1 mirrors block B-j-1: its target is x^{B-j-1} (x^0 = x~ for the last stage).
            let target = if j + 1 == b { t.noisy } else { &t.trajectory[b - j - 2] };
            let d = mse(out, &self.align_target(target)?)?;
            align_raw += d.mean_all()?.to_scalar::<f32>()? as f64;
            terms.push(self.adaptive(&d)?);
        }
        if !stage_outputs.is_empty() {
            parts.push(("align".to_string(), align_raw));
        }
        let recon_target = if self.learned_denoise { t.clean } else { t.noisy };
        let mut end_terms = vec![("recon".to_string(), mse(&pred.x, recon_target)?, 1.0)];
        if let Some(p) = perceptual {
            end_terms.extend(p.distances(&pred.x, recon_target)?.into_iter().map(|d| (d.name, d.distance, d.weight)));
        }
        for (name, d, weight) in end_terms {
            parts.push((name, d.mean_all()?.to_scalar::<f32>()? as f64));
            terms.push((self.adaptive(&d)? * weight)?);
        }
        let mut per_sample = terms[0].clone();
        for term in &terms[1..] {
            per_sample = (per_sample + term)?;
        }
        Ok(LossValue { total: per_sample.mean_all()?, parts })
    }
}

/// Training-time guidance (eq. 5): G's output at scale w is the GUIDED prediction
/// `(1 + w) G_cond - w G_uncond`, so the conditional prediction it implies,
/// `[G(.|c, w) + w sg(G(.|null, w))] / (1 + w)`, is what the targets supervise. `w` (N) is 0 for
/// samples whose label was dropped (their prediction is unconditional already).
pub fn implied_conditional(guided: &ReverseOutput, uncond: &ReverseOutput, w: &[f32]) -> Result<ReverseOutput> {
    let n = w.len();
    let dev = guided.x.device();
    let a = Tensor::from_vec(w.iter().map(|w| 1.0 / (1.0 + w)).collect::<Vec<f32>>(), (n, 1, 1), dev)?;
    let bw = Tensor::from_vec(w.iter().map(|w| w / (1.0 + w)).collect::<Vec<f32>>(), (n, 1, 1), dev)?;
    let mix = |g: &Tensor, u: &Tensor| -> Result<Tensor> { Ok((g.broadcast_mul(&a)? + u.detach().broadcast_mul(&bw)?)?) };
    let zip = |g: &[Tensor], u: &[Tensor]| g.iter().zip(u).map(|(g, u)| mix(g, u)).collect::<Result<Vec<_>>>();
    Ok(ReverseOutput { x: mix(&guided.x, &uncond.x)?, heads: zip(&guided.heads, &uncond.heads)?, states: zip(&guided.states, &uncond.states)? })
}
