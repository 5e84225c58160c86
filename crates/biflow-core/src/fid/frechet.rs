//! The Frechet distance between two Gaussians, in float64:
//!
//! `d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrt(sqrt(S1) S2 sqrt(S1))`.
//!
//! pytorch-fid computes `tr sqrtm(S1 S2)` with scipy's general (Schur) matrix square root. For covariance
//! matrices (symmetric positive semi-definite) `S1 S2` is similar to `sqrt(S1) S2 sqrt(S1)`, which is
//! symmetric PSD, so the trace is the sum of the square roots of its eigenvalues. We therefore use two
//! SYMMETRIC eigendecompositions (faer): `S1 = U diag(l) U^T`, `sqrt(S1) = U diag(sqrt(max(l, 0))) U^T`,
//! then the eigenvalues of `M = sqrt(S1) S2 sqrt(S1)` (symmetrised, `(M + M^T) / 2`).
//!
//! Near-singular products (fewer samples than dimensions, so `S1` or `S2` is rank-deficient): rounding can
//! make eigenvalues of `S1` or `M` slightly negative; they are clamped to 0 before the square root. This is
//! exact in exact arithmetic (a PSD matrix has no negative eigenvalues), needs no `eps * I` offset (which
//! pytorch-fid adds only when scipy's sqrtm returns non-finite values) and never yields complex values (the
//! imaginary parts pytorch-fid discards). Non-finite inputs are refused.

use anyhow::{ensure, Result};
use faer::{Mat, Side};

/// Mean and covariance of a set of feature vectors, float64.
#[derive(Debug, Clone)]
pub struct Gaussian {
    pub mu: Vec<f64>,
    /// Row-major `dim x dim`.
    pub sigma: Vec<f64>,
}

impl Gaussian {
    pub fn dim(&self) -> usize {
        self.mu.len()
    }

    pub fn check(&self, what: &str) -> Result<()> {
        let d = self.dim();
        ensure!(d > 0, "{what}: mu is empty");
        ensure!(
            self.sigma.len() == d * d,
            "{what}: sigma has {} values, but mu has {d} dimensions (sigma must be {d}x{d})",
            self.sigma.len()
        );
        ensure!(self.mu.iter().chain(&self.sigma).all(|v| v.is_finite()), "{what}: mu or sigma holds NaN or infinite values");
        Ok(())
    }
}

/// `tr sqrt(sqrt(S1) S2 sqrt(S1))` and the smallest eigenvalue seen before clamping (a diagnostic).
fn trace_sqrt_product(s1: &Mat<f64>, s2: &Mat<f64>) -> Result<f64> {
    let e = s1.self_adjoint_eigen(Side::Lower).map_err(|e| anyhow::anyhow!("eigendecomposition of sigma1 failed: {e:?}"))?;
    let u = e.U();
    let l = e.S().column_vector();
    let n = s1.nrows();
    // sqrt(S1) = U diag(sqrt(l)) U^T
    let us = Mat::<f64>::from_fn(n, n, |i, j| u[(i, j)] * l[j].max(0.0).sqrt());
    let a = &us * u.transpose();
    let m = &a * s2 * &a;
    let m = Mat::<f64>::from_fn(n, n, |i, j| 0.5 * (m[(i, j)] + m[(j, i)]));
    let ev = m.self_adjoint_eigenvalues(Side::Lower).map_err(|e| anyhow::anyhow!("eigendecomposition failed: {e:?}"))?;
    Ok(ev.iter().map(|&v| v.max(0.0).sqrt()).sum())
}

/// The Frechet distance between two Gaussians (the FID when they are Inception pool3 statistics).
pub fn frechet_distance(a: &Gaussian, b: &Gaussian) -> Result<f64> {
    a.check("the first statistics")?;
    b.check("the second statistics")?;
    ensure!(a.dim() == b.dim(), "the statistics have different dimensions ({} and {})", a.dim(), b.dim());
    let n = a.dim();
    let diff2: f64 = a.mu.iter().zip(&b.mu).map(|(x, y)| (x - y) * (x - y)).sum();
    let s1 = Mat::<f64>::from_fn(n, n, |i, j| a.sigma[i * n + j]);
    let s2 = Mat::<f64>::from_fn(n, n, |i, j| b.sigma[i * n + j]);
    let tr1: f64 = (0..n).map(|i| a.sigma[i * n + i]).sum();
    let tr2: f64 = (0..n).map(|i| b.sigma[i * n + i]).sum();
    let trsq = trace_sqrt_product(&s1, &s2)?;
    Ok(diff2 + tr1 + tr2 - 2.0 * trsq)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::npy::read_npz;

    fn load(name: &str) -> Gaussian {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/fid-reference").join(name);
        let m = read_npz(&p).unwrap();
        Gaussian { mu: m["mu"].to_f64(), sigma: m["sigma"].to_f64() }
    }

    #[test]
    fn matches_pytorch_fid() {
        let a = load("stats-a.npz");
        let b = load("stats-b.npz");
        let bc = load("stats-b-compressed.npz");
        assert_eq!(b.mu, bc.mu);
        assert_eq!(b.sigma, bc.sigma);
        let d = frechet_distance(&a, &b).unwrap();
        let want = 598.7282851342064;
        assert!(((d - want) / want).abs() <= 1e-6, "{d} vs {want}");
        let d0 = frechet_distance(&a, &a).unwrap();
        assert!(d0.abs() < 1e-6, "{d0}");
    }

    #[test]
    fn wrong_shapes_are_refused() {
        let a = load("stats-a.npz");
        let mut bad = a.clone();
        bad.sigma.truncate(10);
        assert!(format!("{:#}", frechet_distance(&a, &bad).unwrap_err()).contains("sigma"));
        let small = Gaussian { mu: vec![0.0; 2], sigma: vec![1.0, 0.0, 0.0, 1.0] };
        assert!(format!("{:#}", frechet_distance(&a, &small).unwrap_err()).contains("different dimensions"));
    }

    #[test]
    fn singular_covariances_are_handled() {
        // Rank-1 covariances in 3-D: d^2 = |mu|^2 + 1 + 4 - 2 * tr sqrt(...). With S1 = e1 e1^T, S2 = 4 e1 e1^T
        // the product is 4 e1 e1^T, tr sqrt = 2, so d^2 = 1 + 4 - 4 = 1.
        let mut s1 = vec![0.0; 9];
        s1[0] = 1.0;
        let mut s2 = vec![0.0; 9];
        s2[0] = 4.0;
        let d = frechet_distance(&Gaussian { mu: vec![0.0; 3], sigma: s1 }, &Gaussian { mu: vec![0.0; 3], sigma: s2 }).unwrap();
        assert!((d - 1.0).abs() < 1e-12, "{d}");
    }
}
