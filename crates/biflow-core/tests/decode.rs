//! Exact decoding: the CPU f32 host decoder agrees with the composed candle ops (the path other
//! devices and dtypes take, here run in f64), with and without labels and guidance, for batches
//! that split unevenly over the worker threads and for a single sample.

use std::collections::HashMap;

use biflow_core::models::flow::{initial_parameters, FlowConfig, ReverseOptions, TarFlow};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal, StandardNormal};

const SEED: u64 = 11;

fn config() -> FlowConfig {
    // 8x8x2 images, patch 2: T = 16, D = 8; two heads per layer; soft clip on.
    FlowConfig { img_size: 8, in_channels: 2, patch_size: 2, channels: 128, num_blocks: 3, layers_per_block: 2, num_classes: 3, clip_scale: Some(2.0) }
}

/// Initial parameters with the zero output projections and the LayerNorm affines randomised, so that
/// decoding moves every token.
fn parameters(cfg: &FlowConfig) -> HashMap<String, Tensor> {
    let dev = Device::Cpu;
    let mut params = initial_parameters(cfg, SEED, &dev).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(SEED + 1);
    let normal = Normal::new(0.0f32, 0.05).unwrap();
    let mut names: Vec<String> = params.keys().cloned().collect();
    names.sort();
    for name in names {
        let t = params.get_mut(&name).unwrap();
        if name.contains("proj_out") || name.contains(".norm.") {
            let noise: Vec<f32> = (0..t.elem_count()).map(|_| normal.sample(&mut rng)).collect();
            *t = (t.clone() + Tensor::from_vec(noise, t.dims(), &dev).unwrap()).unwrap();
        }
    }
    params
}

fn model(params: &HashMap<String, Tensor>, cfg: &FlowConfig, dtype: DType) -> TarFlow {
    TarFlow::new(VarBuilder::from_tensors(params.clone(), dtype, &Device::Cpu), cfg).unwrap()
}

#[test]
fn host_decoder_matches_candle_ops() {
    let cfg = config();
    let params = parameters(&cfg);
    let (host, composed) = (model(&params, &cfg, DType::F32), model(&params, &cfg, DType::F64));
    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    let options = [
        ReverseOptions::default(),
        ReverseOptions { guidance: 1.5, annealed: true, attn_temp: 0.8 },
        ReverseOptions { guidance: 0.7, annealed: false, attn_temp: 1.0 },
    ];
    for (n, labels) in [(5, Some(vec![0i64, 1, 2, -1, 1])), (1, Some(vec![2])), (3, None)] {
        let (t, d) = (cfg.num_tokens(), cfg.token_dim());
        let z: Vec<f32> = (0..n * t * d).map(|_| StandardNormal.sample(&mut rng)).collect();
        let z = Tensor::from_vec(z, (n, t, d), &Device::Cpu).unwrap();
        let y = labels.map(|l| Tensor::from_vec(l, n, &Device::Cpu).unwrap());
        for opts in &options {
            let a = host.reverse_tokens(&z, y.as_ref(), opts, |_, _| Ok(())).unwrap();
            let b = composed.reverse_tokens(&z, y.as_ref(), opts, |_, _| Ok(())).unwrap().to_dtype(DType::F32).unwrap();
            let moved = (&a - &z).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            let err = (&a - &b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(moved > 0.1, "decoding barely moved the tokens ({moved})");
            // f32 against f64: a few float32 ulps of the largest token.
            assert!(err <= 1e-5 * scale.max(1.0), "batch {n}, {opts:?}: host decoder differs from the candle ops by {err} (max |x| {scale})");
        }
    }
}
