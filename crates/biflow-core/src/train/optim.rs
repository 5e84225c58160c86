//! The optimiser pieces of training, on host-side f32 buffers so that every bit of their state can be
//! saved and restored: AdamW (decoupled weight decay), the warmup + cosine learning-rate schedule,
//! global-norm gradient clipping and an exponential moving average of the weights.
//!
//! Every update is elementwise (parallel over fixed chunks) and every reduction sums fixed chunks in a
//! fixed order, so results do not depend on the number of threads.

use rayon::prelude::*;

const CHUNK: usize = 1 << 14;

/// AdamW hyper-parameters (learning rate comes from the schedule at each step).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 1e-4 }
    }
}

/// The moments of one parameter.
#[derive(Clone, Debug, PartialEq)]
pub struct Moments {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

impl Moments {
    pub fn zeros(n: usize) -> Moments {
        Moments { m: vec![0.0; n], v: vec![0.0; n] }
    }
}

/// AdamW with moments the caller can save: `p <- p - lr*(m^/(sqrt(v^)+eps) + wd*p)` (decoupled decay,
/// applied only where `decay` is true: the weight matrices).
pub struct AdamW {
    pub cfg: AdamWConfig,
    /// Number of updates done so far (the bias correction uses it).
    pub t: u64,
}

impl AdamW {
    pub fn new(cfg: AdamWConfig) -> AdamW {
        AdamW { cfg, t: 0 }
    }

    /// Start one update: advances the step counter. Then call [`AdamW::update`] for every parameter.
    pub fn begin_step(&mut self) {
        self.t += 1;
    }

    /// Update one parameter in place. `grad_scale` multiplies the gradient (clipping).
    pub fn update(&self, param: &mut [f32], grad: &[f32], mom: &mut Moments, lr: f64, grad_scale: f64, decay: bool) {
        assert_eq!(param.len(), grad.len());
        assert_eq!(param.len(), mom.m.len());
        let c = self.cfg;
        let t = self.t.max(1) as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        let b1 = c.beta1 as f32;
        let b2 = c.beta2 as f32;
        let step = (lr / bc1) as f32;
        let inv_sqrt_bc2 = (1.0 / bc2.sqrt()) as f32;
        let eps = c.eps as f32;
        let shrink = if decay { (1.0 - lr * c.weight_decay) as f32 } else { 1.0 };
        let gs = grad_scale as f32;
        param
            .par_chunks_mut(CHUNK)
            .zip(grad.par_chunks(CHUNK))
            .zip(mom.m.par_chunks_mut(CHUNK).zip(mom.v.par_chunks_mut(CHUNK)))
            .for_each(|((p, g), (m, v))| {
                for i in 0..p.len() {
                    let gi = g[i] * gs;
                    let mi = b1 * m[i] + (1.0 - b1) * gi;
                    let vi = b2 * v[i] + (1.0 - b2) * gi * gi;
                    m[i] = mi;
                    v[i] = vi;
                    p[i] = p[i] * shrink - step * mi / (vi.sqrt() * inv_sqrt_bc2 + eps);
                }
            });
    }
}

/// Learning rate at update `step` (1-based): linear warmup over `warmup` steps to `peak`, then cosine
/// decay to `min` at `total`.
pub fn lr_at(step: u64, total: u64, warmup: u64, peak: f64, min: f64) -> f64 {
    if warmup > 0 && step <= warmup {
        return peak * step as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step.saturating_sub(warmup)) as f64 / span).clamp(0.0, 1.0);
    min + 0.5 * (peak - min) * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// Sum of squares of `x` in f64, over fixed chunks summed in order (thread-count independent).
pub fn sum_squares(x: &[f32]) -> f64 {
    let parts: Vec<f64> = x.par_chunks(CHUNK).map(|c| c.iter().map(|&v| (v as f64) * (v as f64)).sum()).collect();
    parts.iter().sum()
}

/// The global L2 norm of all gradients.
pub fn global_norm<'a>(grads: impl IntoIterator<Item = &'a [f32]>) -> f64 {
    grads.into_iter().map(sum_squares).sum::<f64>().sqrt()
}

/// The factor that brings a gradient of norm `norm` down to `max_norm` (1 when already within, or when
/// clipping is off: `max_norm <= 0`).
pub fn clip_scale(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}

/// The EMA decay used at update `step`: ramps up as `(1+t)/(10+t)` so early averages are not stuck at
/// the initial weights, capped at `decay`.
pub fn ema_decay_at(step: u64, decay: f64) -> f64 {
    let t = step as f64;
    decay.min((1.0 + t) / (10.0 + t))
}

/// `ema <- d*ema + (1-d)*param`.
pub fn ema_update(ema: &mut [f32], param: &[f32], d: f64) {
    let d = d as f32;
    ema.par_chunks_mut(CHUNK).zip(param.par_chunks(CHUNK)).for_each(|(e, p)| {
        for i in 0..e.len() {
            e[i] = d * e[i] + (1.0 - d) * p[i];
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adamw_matches_the_formula_and_decays_only_when_asked() {
        let mut opt = AdamW::new(AdamWConfig::default());
        let mut p = vec![1.0f32, -2.0];
        let g = vec![0.5f32, -0.25];
        let mut mom = Moments::zeros(2);
        opt.begin_step();
        opt.update(&mut p, &g, &mut mom, 0.1, 1.0, true);
        // First step: m^ = g, v^ = g^2 so the step is lr*sign(g) (up to eps), plus decay.
        let want0 = 1.0 * (1.0 - 0.1 * 1e-4) - 0.1;
        let want1 = -2.0 * (1.0 - 0.1 * 1e-4) + 0.1;
        assert!((p[0] as f64 - want0).abs() < 1e-6, "{p:?}");
        assert!((p[1] as f64 - want1).abs() < 1e-6, "{p:?}");
        let mut q = vec![1.0f32];
        let mut mq = Moments::zeros(1);
        opt.update(&mut q, &[0.0], &mut mq, 0.1, 1.0, false);
        assert_eq!(q[0], 1.0);
    }

    #[test]
    fn schedule_warms_up_then_decays_to_min() {
        assert!((lr_at(1, 100, 10, 1.0, 0.0) - 0.1).abs() < 1e-12);
        assert!((lr_at(10, 100, 10, 1.0, 0.0) - 1.0).abs() < 1e-12);
        assert!((lr_at(55, 100, 10, 1.0, 0.0) - 0.5).abs() < 1e-12);
        assert!((lr_at(100, 100, 10, 1.0, 0.1) - 0.1).abs() < 1e-12);
        assert!(lr_at(30, 100, 10, 1.0, 0.0) > lr_at(60, 100, 10, 1.0, 0.0));
    }

    #[test]
    fn clipping_and_norm() {
        let a = [3.0f32];
        let b = [4.0f32];
        let n = global_norm([&a[..], &b[..]]);
        assert!((n - 5.0).abs() < 1e-12);
        assert!((clip_scale(n, 1.0) * n - 1.0).abs() < 1e-6);
        assert_eq!(clip_scale(n, 10.0), 1.0);
        assert_eq!(clip_scale(n, 0.0), 1.0);
    }

    #[test]
    fn ema_moves_towards_params() {
        let mut e = vec![0.0f32; 3];
        ema_update(&mut e, &[1.0, 2.0, 3.0], 0.5);
        assert_eq!(e, vec![0.5, 1.0, 1.5]);
        assert!(ema_decay_at(0, 0.999) < 0.2 && ema_decay_at(1_000_000, 0.999) == 0.999);
    }
}
