//! Distillation tests on a tiny synthetic dataset: G learns to invert F, resume is bit-exact, a
//! missing, moved or changed forward run and mismatched data are clear errors, NaN stops the run.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use biflow_core::jobs::distill::{distill_with, DistillSettings};
use biflow_core::jobs::training::SessionArgs;
use biflow_core::eval::reverse::Pair;
use biflow_core::job::JobCtx;
use biflow_core::models::reverse::{self, ReverseConfig};
use biflow_core::run::Run;
use biflow_core::jobs::train::{train_with, TrainSettings};
use candle_core::{Device, Tensor};
use common::{cancelling_ctx, toy_data, toy_data_sized, toy_flow_settings};
use rand::SeedableRng;

/// One forward run shared by the tests (trained once): 8x8, patch 2 (T = 16, D = 4), 2 blocks.
fn forward_run() -> &'static Path {
    static RUN: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &RUN.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("f");
        let s = TrainSettings { clip_scale: Some(2.0), ..toy_flow_settings(80, 1) };
        let args = SessionArgs { out: out.clone(), ..Default::default() };
        train_with(&args, &s, "toy", &toy_data(256, 3), &JobCtx::silent()).unwrap();
        (dir, out)
    })
    .1
}

fn settings(forward: &Path, steps: u64) -> DistillSettings {
    DistillSettings {
        forward: Some(forward.display().to_string()),
        batch_size: Some(16),
        steps: Some(steps),
        lr: Some(2e-3),
        warmup: Some(5),
        channels: Some(64),
        save_every: Some(10),
        keep: Some(2),
        seed: Some(5),
        ..Default::default()
    }
}

fn distill(out: &Path, resume: bool, s: DistillSettings, ctx: &JobCtx) -> anyhow::Result<serde_json::Value> {
    let args = SessionArgs { out: out.to_path_buf(), resume, ..Default::default() };
    distill_with(&args, &s, "toy", &toy_data(256, 3), ctx)
}

/// Mean reconstruction MSE of G(F(x~)) against x on held-out toy images.
fn reconstruction(run: &Run, g: &reverse::ReverseModel) -> f64 {
    let flow = run.load_flow(&Device::Cpu).unwrap();
    let held_out = toy_data(64, 99);
    let x = Tensor::from_vec(held_out.images, (64, 1, 8, 8), &Device::Cpu).unwrap();
    let y = Tensor::from_vec(held_out.labels, 64, &Device::Cpu).unwrap();
    let pair = Pair { flow: &flow, g, sigma: 0.05 };
    let mut latents = biflow_core::eval::reverse::LatentStats::default();
    let mse = pair.reconstruction_mse(&x, Some(&y), &mut rand::rngs::StdRng::seed_from_u64(0), &mut latents).unwrap();
    mse.iter().sum::<f64>() / mse.len() as f64
}

#[test]
fn distilled_g_inverts_f_far_better_than_an_untrained_one() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("g");
    let r = distill(&out, false, settings(forward_run(), 300), &JobCtx::silent()).unwrap();
    assert_eq!(r["steps"], 300);
    let run = Run::open(&out).unwrap();
    assert!(run.is_distilled() && out.join("loss.png").is_file() && out.join("metrics.jsonl").is_file());
    let g_cfg: &ReverseConfig = run.config.reverse.as_ref().unwrap();
    let (_vm, untrained) = reverse::new_trainable(g_cfg, 5, &Device::Cpu).unwrap();
    let (before, after) = (reconstruction(&run, &untrained), reconstruction(&run, &run.load_reverse(&Device::Cpu).unwrap()));
    assert!(after < 0.25 * before, "reconstruction MSE {after} after distillation, {before} untrained");
    // The alignment and reconstruction terms are logged and fall.
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let mean = |k: &str, xs: &[serde_json::Value]| xs.iter().map(|v| v[k].as_f64().unwrap()).sum::<f64>() / xs.len() as f64;
    for k in ["align", "recon"] {
        assert!(mean(k, &lines[280..]) < 0.5 * mean(k, &lines[..10]), "{k} did not fall");
    }
}

#[test]
fn distill_resume_after_interrupt_is_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    distill(&a, false, settings(forward_run(), 24), &JobCtx::silent()).unwrap();
    let err = distill(&b, false, settings(forward_run(), 24), &cancelling_ctx(7)).unwrap_err();
    assert!(err.downcast_ref::<biflow_core::Cancelled>().is_some(), "{err:#}");
    assert_eq!(Run::open(&b).unwrap().latest_checkpoint().unwrap().unwrap().step, 7);
    let r = distill(&b, true, DistillSettings::default(), &JobCtx::silent()).unwrap();
    assert_eq!(r["resumedFrom"], 7);
    for f in ["weights.safetensors", "checkpoints/step-00000024/model.safetensors", "checkpoints/step-00000024/optimizer.safetensors"] {
        assert!(std::fs::read(a.join(f)).unwrap() == std::fs::read(b.join(f)).unwrap(), "{f} differs after resume");
    }
    // A changed model option on resume is refused.
    let e = distill(&b, true, DistillSettings { channels: Some(128), steps: Some(30), ..Default::default() }, &JobCtx::silent());
    assert!(format!("{:#}", e.unwrap_err()).contains("channels"));
}

#[test]
fn bad_forward_runs_and_data_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let err = |s: DistillSettings, out: &str| format!("{:#}", distill(&dir.path().join(out), false, s, &JobCtx::silent()).unwrap_err());
    // Not a run.
    let e = err(settings(dir.path(), 5), "x1");
    assert!(e.contains("not a biflow run"), "{e}");
    // Data of another shape than F's.
    let s5 = settings(forward_run(), 5);
    let args = SessionArgs { out: dir.path().join("x2"), ..Default::default() };
    let mut small = toy_data(64, 1);
    small.size = 4;
    small.images.truncate(64 * 16);
    let e = format!("{:#}", distill_with(&args, &s5, "small", &small, &JobCtx::silent()).unwrap_err());
    assert!(e.contains("does not match the forward model"), "{e}");
    assert!(!dir.path().join("x2").exists(), "a refused distill leaves nothing on disk");
    // Guidance range on... and a distilled run given as F.
    let g = dir.path().join("g");
    distill(&g, false, settings(forward_run(), 3), &JobCtx::silent()).unwrap();
    let e = err(settings(&g, 3), "x3");
    assert!(e.contains("is a distilled run"), "{e}");
    // F moved, then F changed: the distilled run says so.
    let f_copy = dir.path().join("f");
    copy_dir(forward_run(), &f_copy);
    let g2 = dir.path().join("g2");
    distill(&g2, false, settings(&f_copy, 3), &JobCtx::silent()).unwrap();
    let moved = dir.path().join("f-moved");
    std::fs::rename(&f_copy, &moved).unwrap();
    let e = format!("{:#}", Run::open(&g2).unwrap().load_flow(&Device::Cpu).err().unwrap());
    assert!(e.contains("moved or deleted"), "{e}");
    std::fs::rename(&moved, &f_copy).unwrap();
    Run::open(&g2).unwrap().load_flow(&Device::Cpu).unwrap();
    let w = f_copy.join("weights.safetensors");
    let mut bytes = std::fs::read(&w).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&w, bytes).unwrap();
    let e = format!("{:#}", Run::open(&g2).unwrap().load_flow(&Device::Cpu).err().unwrap());
    assert!(e.contains("changed since"), "{e}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.path().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn non_finite_loss_stops_and_keeps_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("g");
    let s30 = settings(forward_run(), 30);
    let args = SessionArgs { out: out.clone(), debug_nan_at_step: Some(15), ..Default::default() };
    let e = format!("{:#}", distill_with(&args, &s30, "toy", &toy_data(256, 3), &JobCtx::silent()).unwrap_err());
    assert!(e.contains("loss became NaN at step 15") && e.contains("step-00000010"), "{e}");
    assert_eq!(Run::open(&out).unwrap().latest_checkpoint().unwrap().unwrap().step, 10);
}

/// With both perceptual terms (LPIPS: the fixture's formula VGG16 and the real v0.1 heads;
/// ConvNeXt-V2: the small random one of fixtures/convnext) on random crops of 16x16 images resized to
/// 32: each term is logged and falls, bad flags and weights are refused before anything is written,
/// and a resumed run ends bit-equal to an uninterrupted one (the crops come from the run's stream).
#[test]
fn distills_with_perceptual_terms_and_resumes_bit_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let data = || toy_data_sized(64, 3, 16);
    let f = dir.path().join("f16");
    let fs = TrainSettings { patch_size: Some(4), ..toy_flow_settings(10, 1) };
    train_with(&SessionArgs { out: f.clone(), ..Default::default() }, &fs, "toy16", &data(), &JobCtx::silent()).unwrap();
    let vgg = dir.path().join("vgg.safetensors");
    biflow_core::io::tensors::write_safetensors(&vgg, &biflow_core::eval::lpips::formula_backbone()).unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
    let heads = fixtures.join("lpips/vgg-lin-v0.1.pth");
    let s = DistillSettings {
        lpips: Some(heads.display().to_string()),
        vgg: Some(vgg.display().to_string()),
        convnext: Some(fixtures.join("convnext/tiny-random").display().to_string()),
        perceptual_size: Some(32),
        batch_size: Some(8),
        ..settings(&f, 30)
    };
    let run = |out: &Path, resume: bool, s: DistillSettings, ctx: &JobCtx| {
        distill_with(&SessionArgs { out: out.to_path_buf(), resume, ..Default::default() }, &s, "toy16", &data(), ctx)
    };
    let whole = dir.path().join("whole");
    run(&whole, false, s.clone(), &JobCtx::silent()).unwrap();
    let metrics = std::fs::read_to_string(whole.join("metrics.jsonl")).unwrap();
    for term in ["lpips", "convnext"] {
        let v: Vec<f64> = metrics.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?.get(term)?.as_f64()).collect();
        assert_eq!(v.len(), 30, "every step logs its {term} term");
        assert!(v.iter().all(|v| v.is_finite() && *v > 0.0));
        let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
        assert!(mean(&v[20..]) < mean(&v[..10]), "{term} does not fall: {v:?}");
    }
    let config = std::fs::read_to_string(whole.join("config.json")).unwrap();
    assert!(config.contains("\"convnextWeight\": 0.1") && config.contains("\"crop\": \"random\""), "{config}");
    let report = std::fs::read_to_string(whole.join("report.html")).unwrap();
    assert!(report.contains("convnext") && report.contains("lpips"), "the report shows neither term");
    let cut = dir.path().join("cut");
    assert!(run(&cut, false, s.clone(), &cancelling_ctx(10)).is_err());
    run(&cut, true, DistillSettings { forward: None, ..Default::default() }, &JobCtx::silent()).unwrap();
    let read = |d: &Path| std::fs::read(d.join("weights.safetensors")).unwrap();
    assert!(read(&whole) == read(&cut), "the resumed run's weights differ from the uninterrupted run's");
    let refused = |name: &str, s: DistillSettings, says: &str| {
        let out = dir.path().join(name);
        let err = format!("{:#}", run(&out, false, s, &JobCtx::silent()).unwrap_err());
        assert!(err.contains(says), "{err}");
        assert!(!out.exists(), "{name}: a refused run wrote {}", out.display());
    };
    refused("x", DistillSettings { vgg: None, ..s.clone() }, "--lpips needs --vgg");
    refused("y", DistillSettings { vgg: Some(heads.display().to_string()), ..s.clone() }, "features.0.weight");
    refused("z", DistillSettings { convnext: Some(f.display().to_string()), ..s.clone() }, "config.json");
    refused("w", DistillSettings { perceptual_size: Some(16), ..s }, "at least 32x32");
}
