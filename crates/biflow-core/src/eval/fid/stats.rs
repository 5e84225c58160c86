//! Streaming activation statistics (mean and covariance) in float64, and their `.npz` files.
//!
//! The covariance is accumulated around a shift `k` (the first vector seen): `sum (x - k)` and
//! `sum (x - k)(x - k)^T`, which avoids the cancellation of the naive `E[x x^T] - mu mu^T`. The result is
//! numpy's `np.cov(act, rowvar=False)` (divided by `n - 1`), as pytorch-fid computes it.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};

use super::frechet::Gaussian;
use crate::io::npy::{read_npz, write_npz, Array};

pub struct StatsAccumulator {
    dim: usize,
    n: u64,
    shift: Vec<f64>,
    sum: Vec<f64>,
    /// Upper-left `dim x dim`, row-major: sum of (x - k)(x - k)^T.
    cross: Vec<f64>,
}

impl StatsAccumulator {
    pub fn new(dim: usize) -> Self {
        StatsAccumulator { dim, n: 0, shift: Vec::new(), sum: vec![0.0; dim], cross: vec![0.0; dim * dim] }
    }

    pub fn count(&self) -> u64 {
        self.n
    }

    /// Add a batch of feature vectors (each `dim` long).
    pub fn add(&mut self, batch: &[Vec<f32>]) {
        if batch.is_empty() {
            return;
        }
        let d = self.dim;
        if self.shift.is_empty() {
            self.shift = batch[0].iter().map(|&v| v as f64).collect();
        }
        let b = batch.len();
        let mut x = vec![0f64; b * d];
        for (r, v) in batch.iter().enumerate() {
            assert_eq!(v.len(), d);
            for j in 0..d {
                let c = v[j] as f64 - self.shift[j];
                x[r * d + j] = c;
                self.sum[j] += c;
            }
        }
        // cross += X^T X  (X is b x d, row-major)
        // SAFETY: cross is d x d row-major; X^T is d x b with column stride d, row stride 1.
        unsafe {
            gemm::gemm(
                d,
                d,
                b,
                self.cross.as_mut_ptr(),
                1,
                d as isize,
                true,
                x.as_ptr(),
                d as isize,
                1,
                x.as_ptr(),
                1,
                d as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(rayon::current_num_threads()),
            );
        }
        self.n += b as u64;
    }

    /// The mean and the unbiased covariance.
    pub fn finish(&self) -> Result<Gaussian> {
        ensure!(self.n >= 2, "statistics need at least 2 images, got {}", self.n);
        let d = self.dim;
        let n = self.n as f64;
        let m: Vec<f64> = self.sum.iter().map(|s| s / n).collect();
        let mu: Vec<f64> = m.iter().zip(&self.shift).map(|(a, k)| a + k).collect();
        let mut sigma = vec![0f64; d * d];
        for i in 0..d {
            for j in 0..d {
                sigma[i * d + j] = (self.cross[i * d + j] - n * m[i] * m[j]) / (n - 1.0);
            }
        }
        // Exactly symmetric.
        for i in 0..d {
            for j in i + 1..d {
                let v = 0.5 * (sigma[i * d + j] + sigma[j * d + i]);
                sigma[i * d + j] = v;
                sigma[j * d + i] = v;
            }
        }
        Ok(Gaussian { mu, sigma })
    }
}

/// Write `mu` and `sigma` as pytorch-fid's `--save-stats` does (`np.savez(path, mu=mu, sigma=sigma)`).
pub fn save_stats(path: &Path, g: &Gaussian) -> Result<()> {
    let d = g.dim();
    let mu = Array::from_f64(vec![d], &g.mu)?;
    let sigma = Array::from_f64(vec![d, d], &g.sigma)?;
    write_npz(path, &[("mu", &mu), ("sigma", &sigma)]).with_context(|| format!("cannot write statistics to {}", path.display()))
}

/// Whether an `.npz` holds statistics (`mu` and `sigma`) rather than images.
pub fn is_stats_npz(path: &Path) -> Result<bool> {
    let npz = crate::io::npy::Npz::open(path)?;
    Ok(npz.contains("mu") && npz.contains("sigma"))
}

/// Read `mu` (d) and `sigma` (d x d) from an `.npz` (stored or deflate-compressed members).
pub fn load_stats(path: &Path) -> Result<Gaussian> {
    let m = read_npz(path)?;
    let (Some(mu), Some(sigma)) = (m.get("mu"), m.get("sigma")) else {
        bail!("{} holds no statistics: it needs arrays 'mu' and 'sigma'", path.display());
    };
    ensure!(mu.shape.len() == 1, "{}: mu has shape {:?}, expected (d,)", path.display(), mu.shape);
    let d = mu.shape[0];
    ensure!(
        sigma.shape == vec![d, d],
        "{}: sigma has shape {:?}, expected ({d}, {d}) to match mu",
        path.display(),
        sigma.shape
    );
    let g = Gaussian { mu: mu.to_f64(), sigma: sigma.to_f64() };
    g.check(&path.display().to_string())?;
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_numpy_cov() {
        // Two batches; compare with the two-pass formula.
        let xs: Vec<Vec<f32>> = (0..7).map(|i| (0..3).map(|j| ((i * 7 + j * 3) % 5) as f32 + 100.0 + 0.1 * i as f32).collect()).collect();
        let mut acc = StatsAccumulator::new(3);
        acc.add(&xs[..4]);
        acc.add(&xs[4..]);
        let g = acc.finish().unwrap();
        let n = xs.len() as f64;
        let mu: Vec<f64> = (0..3).map(|j| xs.iter().map(|x| x[j] as f64).sum::<f64>() / n).collect();
        for j in 0..3 {
            assert!((g.mu[j] - mu[j]).abs() < 1e-12);
            for k in 0..3 {
                let c: f64 = xs.iter().map(|x| (x[j] as f64 - mu[j]) * (x[k] as f64 - mu[k])).sum::<f64>() / (n - 1.0);
                assert!((g.sigma[j * 3 + k] - c).abs() < 1e-10, "{j},{k}");
            }
        }
        let one = {
            let mut a = StatsAccumulator::new(3);
            a.add(&xs[..1]);
            a.finish()
        };
        assert!(one.is_err());
    }

    #[test]
    fn stats_round_trip_and_compressed_read_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/fid-reference");
        let b = load_stats(&fx.join("stats-b.npz")).unwrap();
        let bc = load_stats(&fx.join("stats-b-compressed.npz")).unwrap();
        assert_eq!(b.mu, bc.mu);
        assert_eq!(b.sigma, bc.sigma);
        let p = dir.path().join("s.npz");
        save_stats(&p, &b).unwrap();
        let r = load_stats(&p).unwrap();
        assert_eq!(r.sigma, b.sigma);
        assert!(is_stats_npz(&p).unwrap());
        // Wrong shape: sigma (d) instead of (d, d).
        let bad = dir.path().join("bad.npz");
        let mu = Array::from_f64(vec![4], &[0.0; 4]).unwrap();
        let sigma = Array::from_f64(vec![4], &[0.0; 4]).unwrap();
        write_npz(&bad, &[("mu", &mu), ("sigma", &sigma)]).unwrap();
        assert!(format!("{:#}", load_stats(&bad).unwrap_err()).contains("sigma has shape"));
    }
}
