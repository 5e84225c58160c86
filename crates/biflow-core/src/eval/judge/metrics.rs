//! What `eval-quality` computes in the judge's feature space: the Frechet distance (FD_J), k-NN
//! precision and recall (Kynkaanniemi et al. 2019), and within-class diversity.

use anyhow::{ensure, Result};
use rayon::prelude::*;

use crate::eval::fid::stats::StatsAccumulator;
use crate::eval::fid::frechet_distance;

/// N feature vectors of size `dim`, row-major.
#[derive(Clone, Debug, Default)]
pub struct Features {
    pub dim: usize,
    pub data: Vec<f32>,
}

impl Features {
    pub fn new(dim: usize) -> Features {
        Features { dim, data: Vec::new() }
    }
    pub fn len(&self) -> usize {
        self.data.len() / self.dim.max(1)
    }
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }
    /// The first `n` rows.
    pub fn head(&self, n: usize) -> Features {
        Features { dim: self.dim, data: self.data[..n.min(self.len()) * self.dim].to_vec() }
    }
}

fn dist2(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// Frechet distance between Gaussians fitted (float64) to the two feature sets.
pub fn frechet(a: &Features, b: &Features) -> Result<f64> {
    ensure!(a.dim == b.dim, "feature sizes differ ({} vs {})", a.dim, b.dim);
    ensure!(a.len() >= 2 && b.len() >= 2, "the Frechet distance needs at least 2 images on each side");
    let fit = |f: &Features| {
        let mut acc = StatsAccumulator::new(f.dim);
        let rows: Vec<Vec<f32>> = (0..f.len()).map(|i| f.row(i).to_vec()).collect();
        acc.add(&rows);
        acc.finish()
    };
    frechet_distance(&fit(a)?, &fit(b)?)
}

/// Squared distance from each row to its k-th nearest other row of the same set.
fn knn_radii2(f: &Features, k: usize) -> Vec<f32> {
    (0..f.len())
        .into_par_iter()
        .map(|i| {
            let mut d: Vec<f32> = (0..f.len()).filter(|&j| j != i).map(|j| dist2(f.row(i), f.row(j))).collect();
            let k = k.min(d.len()).max(1) - 1;
            *d.select_nth_unstable_by(k, f32::total_cmp).1
        })
        .collect()
}

/// The fraction of `probe` rows that fall inside the k-NN ball of at least one `manifold` row.
fn coverage(manifold: &Features, radii2: &[f32], probe: &Features) -> f64 {
    let inside = (0..probe.len())
        .into_par_iter()
        .filter(|&i| (0..manifold.len()).any(|j| dist2(probe.row(i), manifold.row(j)) <= radii2[j]))
        .count();
    inside as f64 / probe.len().max(1) as f64
}

/// Improved precision and recall with k nearest neighbours: precision = the share of generated
/// samples inside the real manifold (the union of each real sample's k-NN ball), recall = the
/// share of real samples inside the generated manifold.
pub fn precision_recall(real: &Features, fake: &Features, k: usize) -> Result<(f64, f64)> {
    ensure!(real.dim == fake.dim, "feature sizes differ ({} vs {})", real.dim, fake.dim);
    ensure!(real.len() > k && fake.len() > k, "precision and recall with k = {k} need more than {k} images on each side");
    let precision = coverage(real, &knn_radii2(real, k), fake);
    let recall = coverage(fake, &knn_radii2(fake, k), real);
    Ok((precision, recall))
}

/// Mean pairwise feature distance between samples of the same label, averaged over the labels
/// that have at least two samples (None when none has).
pub fn within_class_diversity(f: &Features, labels: &[i64]) -> Option<f64> {
    assert_eq!(f.len(), labels.len());
    let mut classes: Vec<i64> = labels.to_vec();
    classes.sort_unstable();
    classes.dedup();
    let per_class: Vec<f64> = classes
        .par_iter()
        .filter_map(|&c| {
            let idx: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == c).collect();
            if idx.len() < 2 {
                return None;
            }
            let (mut sum, mut pairs) = (0.0f64, 0usize);
            for a in 0..idx.len() {
                for b in a + 1..idx.len() {
                    sum += (dist2(f.row(idx[a]), f.row(idx[b])) as f64).sqrt();
                    pairs += 1;
                }
            }
            Some(sum / pairs as f64)
        })
        .collect();
    (!per_class.is_empty()).then(|| per_class.iter().sum::<f64>() / per_class.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, StandardNormal};

    fn gaussian(n: usize, dim: usize, mean: f32, std: f32, seed: u64) -> Features {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        Features { dim, data: (0..n * dim).map(|_| mean + std * Distribution::<f32>::sample(&StandardNormal, &mut rng)).collect() }
    }

    #[test]
    fn frechet_is_small_for_one_distribution_and_large_for_another() {
        let a = gaussian(2000, 8, 0.0, 1.0, 1);
        let b = gaussian(2000, 8, 0.0, 1.0, 2);
        let c = gaussian(2000, 8, 2.0, 1.0, 3);
        let same = frechet(&a, &b).unwrap();
        let other = frechet(&a, &c).unwrap();
        assert!(same < 0.1, "same distribution: {same}");
        assert!((other - 32.0).abs() < 2.0, "mean shift of 2 in 8 dims: {other}");
    }

    #[test]
    fn precision_and_recall_of_a_sample_against_itself_are_one() {
        let a = gaussian(500, 8, 0.0, 1.0, 4);
        let (p, r) = precision_recall(&a, &a, 3).unwrap();
        assert_eq!((p, r), (1.0, 1.0));
        let b = gaussian(500, 8, 0.0, 1.0, 5);
        let (p, r) = precision_recall(&a, &b, 3).unwrap();
        assert!(p > 0.8 && r > 0.8, "two draws of one distribution: precision {p}, recall {r}");
    }

    #[test]
    fn a_collapsed_sampler_has_full_precision_and_no_recall() {
        let real = gaussian(500, 8, 0.0, 1.0, 6);
        // Every "sample" is a copy of one real point (plus a tiny jitter): all inside the real manifold.
        let mut fake = Features::new(8);
        for i in 0..500 {
            fake.data.extend(real.row(0).iter().map(|v| v + 1e-4 * (i % 7) as f32));
        }
        let (p, r) = precision_recall(&real, &fake, 3).unwrap();
        assert!(p > 0.99, "precision {p}");
        assert!(r < 0.05, "recall {r}");
    }

    #[test]
    fn far_away_samples_have_no_precision() {
        let real = gaussian(300, 8, 0.0, 1.0, 7);
        let fake = gaussian(300, 8, 10.0, 1.0, 8);
        let (p, r) = precision_recall(&real, &fake, 3).unwrap();
        assert_eq!((p, r), (0.0, 0.0));
    }

    #[test]
    fn diversity_is_zero_for_copies_and_grows_with_spread() {
        let labels: Vec<i64> = (0..200).map(|i| i % 4).collect();
        let copies = Features { dim: 3, data: (0..200).flat_map(|i| vec![(i % 4) as f32; 3]).collect() };
        assert_eq!(within_class_diversity(&copies, &labels), Some(0.0));
        let narrow = within_class_diversity(&gaussian(200, 3, 0.0, 1.0, 9), &labels).unwrap();
        let wide = within_class_diversity(&gaussian(200, 3, 0.0, 3.0, 9), &labels).unwrap();
        assert!((wide / narrow - 3.0).abs() < 1e-3, "{narrow} {wide}");
        assert_eq!(within_class_diversity(&copies.head(3), &[0, 1, 2]), None);
    }
}
