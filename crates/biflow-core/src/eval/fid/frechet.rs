//! The Frechet distance between two Gaussians, in float64:
//!
//! `d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrt(sqrt(S1) S2 sqrt(S1))`.
//!
//! pytorch-fid computes `tr sqrtm(S1 S2)` with scipy's general (Schur) matrix square root. For covariance
//! matrices (symmetric positive semi-definite) `S1 S2` is similar to `sqrt(S1) S2 sqrt(S1)`, which is
//! symmetric PSD, so the trace is the sum of the square roots of its eigenvalues. We therefore use two
//! SYMMETRIC eigendecompositions (faer): `S1 = U diag(l) U^T`, `sqrt(S1) = U diag(sqrt(max(l, 0))) U^T`,
//! then the eigenvalues of `M = sqrt(S1) S2 sqrt(S1)` (symmetrised, `(M + M^T) / 2`). When S1 is positive
//! definite, `M = L^T S2 L` with the Cholesky factor `S1 = L L^T` has the same eigenvalues and is cheaper.
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

/// `tr sqrt(sqrt(S1) S2 sqrt(S1))`.
///
/// Fast path: when the Cholesky factorisation `S1 = L L^T` exists (S1 positive definite, the usual case with
/// more samples than dimensions), `S1 S2` is similar to the symmetric `L^T S2 L`, whose eigenvalues alone
/// are needed (no eigenvectors): about half the work of the general path. Otherwise (singular S1) the
/// general path builds `sqrt(S1)` from a symmetric eigendecomposition, clamping negative eigenvalues to 0.
fn trace_sqrt_product(s1: &Mat<f64>, s2: &Mat<f64>) -> Result<f64> {
    let n = s1.nrows();
    let m = match s1.llt(Side::Lower) {
        Ok(llt) => {
            // W = S2 L, then the lower half of M = L^T W (all the eigensolver reads): triangular products.
            use faer::linalg::matmul::triangular::{matmul, BlockStructure as B};
            let l = llt.L();
            let par = faer::get_global_parallelism();
            let mut w = Mat::<f64>::zeros(n, n);
            matmul(w.as_mut(), B::Rectangular, faer::Accum::Replace, s2.as_ref(), B::Rectangular, l, B::TriangularLower, 1.0, par);
            let mut m = Mat::<f64>::zeros(n, n);
            matmul(m.as_mut(), B::TriangularLower, faer::Accum::Replace, l.transpose(), B::TriangularUpper, w.as_ref(), B::Rectangular, 1.0, par);
            let ev = m.self_adjoint_eigenvalues(Side::Lower).map_err(|e| anyhow::anyhow!("eigendecomposition failed: {e:?}"))?;
            return Ok(ev.iter().map(|&v| v.max(0.0).sqrt()).sum());
        }
        Err(_) => {
            let e = s1.self_adjoint_eigen(Side::Lower).map_err(|e| anyhow::anyhow!("eigendecomposition of sigma1 failed: {e:?}"))?;
            let u = e.U();
            let l = e.S().column_vector();
            // sqrt(S1) = U diag(sqrt(max(l, 0))) U^T
            let us = Mat::<f64>::from_fn(n, n, |i, j| u[(i, j)] * l[j].max(0.0).sqrt());
            let a = &us * u.transpose();
            &a * s2 * &a
        }
    };
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
        let d = frechet_distance(&Gaussian { mu: vec![0.0; 3], sigma: s1.clone() }, &Gaussian { mu: vec![0.0; 3], sigma: s2.clone() })
            .unwrap();
        assert!((d - 1.0).abs() < 1e-12, "{d}");
        // Both paths agree on a positive definite pair: S1 = diag(1, 2, 3), S2 = diag(4, 2, 1/3) + the general
        // path forced through a singular S1 = diag(1, 2, 0).
        let diag = |v: [f64; 3]| (0..9).map(|k| if k % 4 == 0 { v[k / 4] } else { 0.0 }).collect::<Vec<_>>();
        let g = |v| Gaussian { mu: vec![0.0; 3], sigma: diag(v) };
        let d = frechet_distance(&g([1.0, 2.0, 3.0]), &g([4.0, 2.0, 1.0 / 3.0])).unwrap();
        let want = 6.0 + (4.0 + 2.0 + 1.0 / 3.0) - 2.0 * (2.0 + 2.0 + 1.0);
        assert!((d - want).abs() < 1e-12, "{d} vs {want}");
        let d = frechet_distance(&g([1.0, 2.0, 0.0]), &g([4.0, 2.0, 1.0 / 3.0])).unwrap();
        let want = 3.0 + 4.0 + 2.0 + 1.0 / 3.0 - 2.0 * (2.0 + 2.0);
        assert!((d - want).abs() < 1e-12, "{d} vs {want}");
    }
}
