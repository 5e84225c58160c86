//! The generic path (composed candle ops, what a GPU runs) equals the CPU's fused path: F's and G's
//! values and gradients, G's loss, exact decoding (host decoder vs device decoder), and bf16 products
//! stay close to f32. All on the CPU, so that the CUDA code path is checked on machines without a GPU.

mod common;

use biflow_core::device::Precision;
use biflow_core::models::flow::{self, FlowConfig, ReverseOptions};
use biflow_core::device::mode;
use biflow_core::models::reverse::loss::{LossConfig, LossKind, Targets};
use biflow_core::models::reverse::{self, ReverseConfig};
use candle_core::{backprop::GradStore, Device, Tensor};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};

fn randn(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..shape.iter().product::<usize>())
        .map(|_| rng.sample(rand_distr::StandardNormal))
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// The largest absolute entry of `t`.
fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// max |a - b| / max(max |b|, 1e-3): a relative error that ignores where b is tiny.
fn rel(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap()) / max_abs(b).max(1e-3)
}

fn flow_config() -> FlowConfig {
    FlowConfig {
        img_size: 8,
        in_channels: 1,
        patch_size: 2,
        channels: 64,
        num_blocks: 2,
        layers_per_block: 2,
        num_classes: 3,
        clip_scale: None,
    }
}

/// Move every weight off its initial value: TARFlow starts as the identity (zero output
/// projections), which would make the values trivially equal.
fn perturb(map: &VarMap, seed: u64) {
    for (i, (_, v)) in map.data().lock().unwrap().iter().enumerate() {
        let noise = (randn(v.dims(), seed + i as u64) * 0.05).unwrap();
        v.set(&(v.as_tensor() + noise).unwrap()).unwrap();
    }
}

/// Compare every variable's gradient in two stores.
fn same_gradients(map: &VarMap, a: &GradStore, b: &GradStore, tol: f32, what: &str) {
    let vars = map.data().lock().unwrap();
    assert!(!vars.is_empty());
    for (name, v) in vars.iter() {
        let (ga, gb) = (a.get(v.as_tensor()), b.get(v.as_tensor()));
        let (ga, gb) = (
            ga.unwrap_or_else(|| panic!("{what}: no fused gradient for {name}")),
            gb.unwrap_or_else(|| panic!("{what}: no generic gradient for {name}")),
        );
        let e = rel(gb, ga);
        assert!(e < tol, "{what}: gradient of {name} differs by {e}");
    }
}

#[test]
fn forward_flow_generic_path_equals_fused() {
    let cfg = flow_config();
    let (map, model) = flow::new_trainable(&cfg, 3, &Device::Cpu).unwrap();
    perturb(&map, 100);
    let x = (randn(&[4, 1, 8, 8], 1) * 0.5).unwrap();
    let y = Tensor::new(&[0i64, 2, -1, 1], &Device::Cpu).unwrap();
    let run = || {
        let out = model.forward(&x, Some(&y)).unwrap();
        let loss = flow::nll_loss(&out).unwrap();
        let grads = loss.backward().unwrap();
        (out.z, out.logdets, loss, grads)
    };
    let (z1, l1, loss1, g1) = run();
    let (z2, l2, loss2, g2) = {
        let _composed = mode::composed();
        run()
    };
    assert!(rel(&z2, &z1) < 1e-4, "z differs by {}", rel(&z2, &z1));
    assert!(rel(&l2, &l1) < 1e-4, "logdets differ by {}", rel(&l2, &l1));
    assert!(rel(&loss2, &loss1) < 1e-5);
    same_gradients(&map, &g1, &g2, 1e-3, "F");
}

#[test]
fn reverse_model_and_loss_generic_path_equal_fused() {
    let f = flow_config();
    let (f_map, flow) = flow::new_trainable(&f, 3, &Device::Cpu).unwrap();
    perturb(&f_map, 200);
    let g_cfg = ReverseConfig::for_flow(&f, 64, 1, 1, true);
    let (map, g) = reverse::new_trainable(&g_cfg, 5, &Device::Cpu).unwrap();
    perturb(&map, 300);
    let clean = flow
        .patchify(&(randn(&[3, 1, 8, 8], 2) * 0.5).unwrap())
        .unwrap();
    let noisy = (&clean + (randn(clean.dims(), 3) * 0.1).unwrap()).unwrap();
    let y = Tensor::new(&[1i64, -1, 2], &Device::Cpu).unwrap();
    let w = [1.5f32, 0.0, 0.25];
    let loss_cfg = LossConfig {
        kind: LossKind::Align,
        rms_norm: true,
        learned_denoise: true,
        adaptive_p: 1.0,
        adaptive_eps: 0.01,
    };
    let run = || {
        let fo = flow.forward_tokens(&noisy, Some(&y)).unwrap();
        let out = g.forward(&fo.z, Some(&y), Some(&w), true).unwrap();
        let targets = Targets {
            clean: &clean,
            noisy: &noisy,
            trajectory: &fo.trajectory,
        };
        let value = loss_cfg.loss(&out, &targets, None).unwrap();
        let grads = value.total.backward().unwrap();
        (out.x, value.total, grads)
    };
    let (x1, loss1, g1) = run();
    let (x2, loss2, g2) = {
        let _composed = mode::composed();
        run()
    };
    assert!(
        rel(&x2, &x1) < 1e-4,
        "G's output differs by {}",
        rel(&x2, &x1)
    );
    assert!(
        rel(&loss2, &loss1) < 1e-4,
        "loss differs by {}",
        rel(&loss2, &loss1)
    );
    same_gradients(&map, &g1, &g2, 1e-3, "G");
}

#[test]
fn exact_decoding_on_the_device_path_equals_the_host_decoder() {
    let mut cfg = flow_config();
    cfg.clip_scale = Some(2.0);
    let (map, model) = flow::new_trainable(&cfg, 7, &Device::Cpu).unwrap();
    perturb(&map, 400);
    let z = randn(&[3, cfg.num_tokens(), cfg.token_dim()], 4);
    let y = Tensor::new(&[2i64, 0, -1], &Device::Cpu).unwrap();
    for opts in [
        ReverseOptions {
            guidance: 0.0,
            annealed: false,
            attn_temp: 1.0,
        },
        ReverseOptions {
            guidance: 1.5,
            annealed: true,
            attn_temp: 0.8,
        },
    ] {
        let mut steps = (0, 0);
        let host = model
            .reverse_tokens(&z, Some(&y), &opts, |_, _| Ok(()))
            .unwrap();
        let device = {
            let _composed = mode::composed();
            model.reverse_tokens(&z, Some(&y), &opts, |d, t| {
                steps = (d, t);
                Ok(())
            })
        }
        .unwrap();
        let e = rel(&device, &host);
        assert!(
            e < 1e-4,
            "decoding (guidance {}) differs by {e}",
            opts.guidance
        );
        let want = cfg.num_blocks * (cfg.num_tokens() - 1);
        assert_eq!(steps, (want, want), "progress reports every step");
    }
}

#[test]
fn bf16_products_stay_close_to_f32_and_keep_gradients() {
    let cfg = flow_config();
    let (map, model) = flow::new_trainable(&cfg, 3, &Device::Cpu).unwrap();
    perturb(&map, 500);
    let x = (randn(&[2, 1, 8, 8], 9) * 0.5).unwrap();
    let _composed = mode::composed();
    let f32_out = model.forward(&x, None).unwrap();
    let (bf_out, grads) = {
        let _bf16 = mode::precision(Precision::Bf16);
        let out = model.forward(&x, None).unwrap();
        let grads = flow::nll_loss(&out).unwrap().backward().unwrap();
        (out, grads)
    };
    // bf16 keeps 8 bits of mantissa: products agree to about 1%, not to f32's 1e-6.
    let e = rel(&bf_out.z, &f32_out.z);
    assert!(e > 0.0 && e < 5e-2, "bf16 z differs from f32 by {e}");
    for (name, v) in map.data().lock().unwrap().iter() {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("no bf16 gradient for {name}"));
        assert_eq!(
            g.dtype(),
            candle_core::DType::F32,
            "{name}: master gradients stay f32"
        );
        assert!(g
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|v| v.is_finite()));
    }
}

/// Training through candle's autograd (what a GPU runs) follows the CPU's hand-written gradient.
#[test]
fn training_on_the_generic_path_follows_the_fused_path() {
    use biflow_core::job::JobCtx;
    use biflow_core::jobs::train::{train_with, TrainSettings};
use biflow_core::jobs::training::SessionArgs;
    let data = common::toy_data(256, 1);
    let s = TrainSettings {
        batch_size: Some(32),
        steps: Some(12),
        channels: Some(64),
        blocks: Some(2),
        layers_per_block: Some(1),
        lr: Some(1e-3),
        noise_std: Some(0.05),
        save_every: Some(1000),
        ..Default::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let losses = |name: &str| -> Vec<f64> {
        let out = dir.path().join(name);
        let args = SessionArgs { out: out.clone(), ..Default::default() };
        train_with(&args, &s, "toy", &data, &JobCtx::silent()).unwrap();
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
            .collect()
    };
    let fused = losses("fused");
    let generic = {
        let _composed = mode::composed();
        losses("generic")
    };
    assert_eq!(fused.len(), 12);
    for (i, (a, b)) in fused.iter().zip(&generic).enumerate() {
        assert!((a - b).abs() <= 1e-3 * a.abs().max(1.0), "step {i}: loss {b} on the generic path, {a} on the fused path");
    }
    assert!(fused[11] < fused[0], "the loss went down: {fused:?}");
}
