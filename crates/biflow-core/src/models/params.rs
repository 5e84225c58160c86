//! One parameter list per model, read off its candle modules. Building a model over a
//! [`Recorder`] lists each parameter's checkpoint name, shape and initialisation in the order the
//! modules ask for them (seeded initialisation and import's checks use the list); building it over
//! a [`Loader`] takes the same parameters from a checkpoint or a VarMap, checked by name and shape,
//! and keeps each with its name (what the CPU engines are given). Either way the modules are the
//! one specification of a model's parameters.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal, Uniform};

/// A model's parameters with their checkpoint names, in list order.
pub(crate) type Named = Vec<(String, Tensor)>;

/// Initialisation of embedding tables: N(0, 0.01^2), as the reference's.
pub(crate) const EMBEDDING: Init = Init::Randn { mean: 0.0, stdev: 0.01 };

/// PyTorch's nn.Linear initialisation of a weight or bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
pub(crate) fn fan_in_uniform(fan_in: usize) -> Init {
    let bound = 1.0 / (fan_in as f32).sqrt();
    Init::Uniform { lo: -bound as f64, up: bound as f64 }
}

/// One parameter of a model.
#[derive(Clone, Debug)]
pub struct Param {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

/// A VarBuilder backend that records what the modules ask for and gives zero-stride zeros (no
/// memory), so that building a model over it costs nothing.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<Param>>>);

impl SimpleBackend for Recorder {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.lock().unwrap().push(Param { name: name.to_string(), shape: s.dims().to_vec(), init: h });
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("the parameter list of a model needs the shape of '{name}'")
    }

    /// Optional tensors (F's prior `var` buffer) are not parameters.
    fn contains_tensor(&self, _: &str) -> bool {
        false
    }
}

/// The parameter list of the modules `build` makes from a VarBuilder.
pub(crate) fn parameter_list<M>(build: impl FnOnce(VarBuilder) -> Result<M>) -> Result<Vec<Param>> {
    let recorder = Recorder::default();
    build(VarBuilder::from_backend(Box::new(recorder.clone()), DType::F32, Device::Cpu))?;
    let list = recorder.0.lock().unwrap().clone();
    Ok(list)
}

/// A VarBuilder backend that hands the modules the tensors of another VarBuilder (a checkpoint,
/// or a trainable model's variables) and keeps each with its name, so the named list and the
/// modules share them. Loading stops at the first missing or mis-shaped tensor.
#[derive(Clone)]
struct Loader<'a> {
    from: VarBuilder<'a>,
    named: Arc<Mutex<Named>>,
}

impl SimpleBackend for Loader<'_> {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, _: &Device) -> candle_core::Result<Tensor> {
        let t = self.from.get_with_hints_dtype(s, name, h, dtype)?;
        self.named.lock().unwrap().push((name.to_string(), t.clone()));
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, _: &Device) -> candle_core::Result<Tensor> {
        self.from.get_unchecked_dtype(name, dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.from.contains_tensor(name)
    }
}

/// The modules `build` makes over the tensors of `vb`, and every parameter they took, with its
/// name, in the order of the model's parameter list.
pub(crate) fn load<'a, M>(vb: &VarBuilder<'a>, build: impl FnOnce(VarBuilder<'a>) -> Result<M>) -> Result<(M, Named)> {
    let loader = Loader { from: vb.clone(), named: Arc::default() };
    let modules = build(VarBuilder::from_backend(Box::new(loader.clone()), vb.dtype(), vb.device().clone()))?;
    let named = loader.named.lock().unwrap().clone();
    Ok((modules, named))
}

/// Check that `tensors` hold every parameter of `list` with its shape (tensors beyond the list are
/// allowed: a checkpoint's classifier, say). The error names the first few missing and mis-shaped.
pub(crate) fn check_tensors(list: &[Param], tensors: &HashMap<String, Tensor>) -> Result<()> {
    let missing: Vec<&str> = list.iter().filter(|p| !tensors.contains_key(&p.name)).map(|p| p.name.as_str()).collect();
    let misshaped: Vec<String> = list
        .iter()
        .filter_map(|p| tensors.get(&p.name).filter(|t| t.dims() != p.shape.as_slice()).map(|t| format!("{} is {:?}, expected {:?}", p.name, t.dims(), p.shape)))
        .collect();
    let first = |v: &[String]| v.iter().take(3).cloned().collect::<Vec<_>>().join(", ") + if v.len() > 3 { ", ..." } else { "" };
    let mut problems = Vec::new();
    if !missing.is_empty() {
        let names: Vec<String> = missing.iter().map(|s| s.to_string()).collect();
        problems.push(format!("{} of {} tensors missing ({})", missing.len(), list.len(), first(&names)));
    }
    if !misshaped.is_empty() {
        problems.push(format!("{} mis-shaped ({})", misshaped.len(), first(&misshaped)));
    }
    anyhow::ensure!(problems.is_empty(), "{}", problems.join("; "));
    Ok(())
}

/// Fresh parameters for `list`, drawn from a seeded host RNG in list order (reproducible: a seed
/// gives the same model on every machine and version).
pub(crate) fn initial_parameters(list: &[Param], seed: u64, device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut params = HashMap::new();
    for p in list {
        let n = p.shape.iter().product::<usize>();
        let values: Vec<f32> = match p.init {
            Init::Const(v) => vec![v as f32; n],
            Init::Uniform { lo, up } => {
                let u = Uniform::new(lo as f32, up as f32);
                (0..n).map(|_| u.sample(&mut rng)).collect()
            }
            Init::Randn { mean, stdev } => {
                let normal = Normal::new(mean as f32, stdev as f32).context("a normal initialisation")?;
                (0..n).map(|_| normal.sample(&mut rng)).collect()
            }
            Init::Kaiming { .. } => anyhow::bail!("{}: Kaiming initialisation is not used by biflow's models", p.name),
        };
        params.insert(p.name.clone(), Tensor::from_vec(values, p.shape.as_slice(), device)?);
    }
    Ok(params)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::flow::{FlowConfig, TarFlow};
    use crate::models::reverse::{ReverseConfig, ReverseModel};

    fn flow() -> FlowConfig {
        FlowConfig { img_size: 8, in_channels: 1, patch_size: 2, channels: 64, num_blocks: 2, layers_per_block: 2, num_classes: 3, clip_scale: None }
    }

    /// A digest of every value of every parameter (sorted by name), position-weighted.
    fn digest(params: &HashMap<String, Tensor>) -> f64 {
        let mut names: Vec<&String> = params.keys().collect();
        names.sort();
        let mut h = 0f64;
        for (k, name) in names.into_iter().enumerate() {
            let v: Vec<f32> = params[name].flatten_all().unwrap().to_vec1().unwrap();
            h += v.iter().enumerate().map(|(i, x)| *x as f64 * ((i % 97) as f64 + 1.0)).sum::<f64>() * (k as f64 + 1.0);
        }
        h
    }

    /// The list read off the modules is the checkpoint's layout, in the reference's order, and a seed
    /// draws the same weights as it always has: the digests are of the weights drawn by the
    /// hand-written initialisation this list replaced (the two matched bit for bit).
    #[test]
    fn the_modules_list_the_parameters_and_seeds_draw_what_they_drew() {
        let list = TarFlow::parameters(&flow()).unwrap();
        let names: Vec<&str> = list.iter().take(5).map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["blocks.0.proj_in.weight", "blocks.0.proj_in.bias", "blocks.0.pos_embed", "blocks.0.class_embed", "blocks.0.attn_blocks.0.attention.norm.weight"]);
        assert_eq!(list.len(), 2 * (2 + 1 + 1 + 2 * 12 + 2));
        assert!(matches!(list.iter().find(|p| p.name == "blocks.1.proj_out.weight").unwrap().init, Init::Const(v) if v == 0.0));
        let f = crate::models::flow::initial_parameters(&flow(), 7, &Device::Cpu).unwrap();
        let g_cfg = ReverseConfig::for_flow(&flow(), 128, 2, 1, true);
        let g = crate::models::reverse::initial_parameters(&g_cfg, 9, &Device::Cpu).unwrap();
        assert_eq!(g.len(), ReverseModel::parameters(&g_cfg).unwrap().len());
        let (df, dg) = (digest(&f), digest(&g));
        assert!((df - F_DIGEST).abs() < 1e-6 * F_DIGEST.abs().max(1.0), "F's seeded initialisation changed: {df}");
        assert!((dg - G_DIGEST).abs() < 1e-6 * G_DIGEST.abs().max(1.0), "G's seeded initialisation changed: {dg}");
    }

    const F_DIGEST: f64 = 518214.48934795207;
    const G_DIGEST: f64 = 2833124.928014168;

    /// Loading names the first missing or mis-shaped tensor.
    #[test]
    fn loading_names_a_missing_or_misshaped_tensor() {
        let mut params = crate::models::flow::initial_parameters(&flow(), 1, &Device::Cpu).unwrap();
        params.remove("blocks.1.attn_blocks.0.mlp.main.0.bias");
        let err = TarFlow::new(VarBuilder::from_tensors(params.clone(), DType::F32, &Device::Cpu), &flow()).err().unwrap();
        assert!(format!("{err:#}").contains("blocks.1.attn_blocks.0.mlp.main.0.bias"), "{err:#}");
        params.insert("blocks.1.attn_blocks.0.mlp.main.0.bias".into(), Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap());
        let err = TarFlow::new(VarBuilder::from_tensors(params, DType::F32, &Device::Cpu), &flow()).err().unwrap();
        assert!(format!("{err:#}").contains("shape"), "{err:#}");
    }
}
