//! Seeded, reproducible initialisation shared by the models (the reference's scheme), and the
//! VarMap that makes parameters trainable.

use std::collections::HashMap;

use anyhow::Result;
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal, Uniform};

use crate::models::flow::config::MLP_EXPANSION;

/// Seeded initial parameters, drawn in the order they are asked for (F and G share it).
pub(crate) struct ParamInit {
    rng: rand::rngs::StdRng,
    device: Device,
    pub params: HashMap<String, Tensor>,
}

impl ParamInit {
    pub fn new(seed: u64, device: &Device) -> ParamInit {
        ParamInit { rng: rand::rngs::StdRng::seed_from_u64(seed), device: device.clone(), params: HashMap::new() }
    }

    fn put(&mut self, name: String, values: Vec<f32>, shape: &[usize]) -> Result<()> {
        self.params.insert(name, Tensor::from_vec(values, shape, &self.device)?);
        Ok(())
    }

    fn uniform(&mut self, n: usize, bound: f32) -> Vec<f32> {
        let u = Uniform::new(-bound, bound);
        (0..n).map(|_| u.sample(&mut self.rng)).collect()
    }

    /// Weight and bias U(-1/sqrt(d_in), 1/sqrt(d_in)) (PyTorch's nn.Linear).
    pub fn linear(&mut self, name: &str, d_in: usize, d_out: usize) -> Result<()> {
        let bound = 1.0 / (d_in as f32).sqrt();
        let w = self.uniform(d_in * d_out, bound);
        let b = self.uniform(d_out, bound);
        self.put(format!("{name}.weight"), w, &[d_out, d_in])?;
        self.put(format!("{name}.bias"), b, &[d_out])
    }

    /// A linear layer whose weight starts at zero (the bias as in [`Self::linear`]).
    pub fn zero_linear(&mut self, name: &str, d_in: usize, d_out: usize) -> Result<()> {
        let b = self.uniform(d_out, 1.0 / (d_in as f32).sqrt());
        self.put(format!("{name}.weight"), vec![0.0; d_in * d_out], &[d_out, d_in])?;
        self.put(format!("{name}.bias"), b, &[d_out])
    }

    /// N(0, 0.01^2) entries.
    pub fn embedding(&mut self, name: &str, shape: &[usize]) -> Result<()> {
        let normal = Normal::new(0.0f32, 0.01).unwrap();
        let v = (0..shape.iter().product::<usize>()).map(|_| normal.sample(&mut self.rng)).collect();
        self.put(name.to_string(), v, shape)
    }

    /// Weight 1, bias 0.
    pub fn layer_norm(&mut self, name: &str, dim: usize) -> Result<()> {
        self.put(format!("{name}.weight"), vec![1.0; dim], &[dim])?;
        self.put(format!("{name}.bias"), vec![0.0; dim], &[dim])
    }

    /// An [`AttentionBlock`] of width `c` under `prefix`.
    pub fn transformer_layer(&mut self, prefix: &str, c: usize) -> Result<()> {
        self.layer_norm(&format!("{prefix}.attention.norm"), c)?;
        self.layer_norm(&format!("{prefix}.mlp.norm"), c)?;
        self.linear(&format!("{prefix}.attention.qkv"), c, 3 * c)?;
        self.linear(&format!("{prefix}.attention.proj"), c, c)?;
        self.linear(&format!("{prefix}.mlp.main.0"), c, MLP_EXPANSION * c)?;
        self.linear(&format!("{prefix}.mlp.main.2"), MLP_EXPANSION * c, c)
    }
}

/// A VarMap holding `params` as trainable variables.
pub(crate) fn varmap_of(params: HashMap<String, Tensor>) -> Result<VarMap> {
    let varmap = VarMap::new();
    {
        let mut data = varmap.data().lock().unwrap();
        for (name, t) in params {
            data.insert(name, candle_core::Var::from_tensor(&t)?);
        }
    }
    Ok(varmap)
}
