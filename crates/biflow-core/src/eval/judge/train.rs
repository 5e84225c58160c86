//! `biflow judge train`: fit the judge to a prepared, labelled dataset by cross-entropy (AdamW,
//! warmup + cosine, seeded host RNG), measure its accuracy on the held-out split, and write J. A few
//! minutes on two cores for MNIST; no checkpoints (a stopped job leaves nothing, run it again).

use std::collections::HashMap;
use std::num::{NonZeroU64, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use candle_core::Tensor;
use candle_nn::VarBuilder;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use super::net::{save_weights, Judge, JudgeConfig, JudgeFile, JUDGE_FILE};
use super::quality::{judge_dataset, labelled_dataset};
use crate::data::Split;
use crate::io::tensors::HostTensor;
use crate::jobs::options::DeviceArgs;
use crate::job::JobCtx;
use crate::train::optim::{lr_at, AdamW, AdamWConfig, Moments};

/// The held-out accuracy below which `eval-quality` refuses a judge, unless `--min-accuracy` says otherwise.
pub const DEFAULT_FLOOR: f64 = 0.9;

crate::options! {
    pub struct JudgeTrainOptions {
        /// a prepared, labelled dataset with a held-out (val) split
        data: String,
        /// the judge folder to create (judge.json, weights.safetensors)
        out: String,
        /// optimiser steps
        steps: NonZeroU64 = 1500,
        /// images per step
        batch_size: NonZeroUsize = 64,
        /// peak learning rate
        lr: f64 = 2e-3,
        /// seed of the initial weights and the data order
        seed: u64 = 0,
        /// held-out accuracy below which eval-quality refuses this judge
        min_accuracy: f64 ["0.9"] = DEFAULT_FLOOR,
        /// replace an existing judge folder
        force: bool,
    }
}

pub fn judge_train(o: JudgeTrainOptions, on: &DeviceArgs, ctx: &JobCtx) -> Result<Value> {
    let on = on.place()?;
    let device = &on.device;
    let (steps, batch, peak, floor) = (o.steps.get(), o.batch_size.get(), o.lr, o.min_accuracy);
    ensure!(peak > 0.0 && peak.is_finite(), "--lr must be a positive number");
    ensure!((0.0..=1.0).contains(&floor), "--min-accuracy must be between 0 and 1");
    let out = PathBuf::from(&o.out);
    crate::io::atomic::ensure_empty_out(&out, o.force)?;
    let ds = labelled_dataset(&o.data)?;
    let (c, h, w) = ds.shape();
    let n_train = ds.len(Split::Train);
    ensure!(n_train >= batch, "the training split has {n_train} images, fewer than --batch-size {batch}");
    let config = JudgeConfig::new(c, h, ds.num_classes());
    config.validate()?;

    // Parameters live on the host (the project's AdamW); candle variables mirror them for autograd.
    let mut params: Vec<(String, HostTensor)> = config.init(o.seed);
    let varmap = crate::models::params::varmap_of(
        params.iter().map(|(n, t)| Ok((n.clone(), Tensor::from_vec(t.data.clone(), t.shape.clone(), device)?))).collect::<Result<HashMap<_, _>>>()?,
    )?;
    let judge = Judge::new(&config, VarBuilder::from_varmap(&varmap, candle_core::DType::F32, device))?;
    let vars: Vec<candle_core::Var> = {
        let data = varmap.data().lock().unwrap();
        params.iter().map(|(n, _)| data[n].clone()).collect()
    };
    let mut adam = AdamW::new(AdamWConfig::default());
    let mut moments: Vec<Moments> = params.iter().map(|(_, t)| Moments::zeros(t.data.len())).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(o.seed);
    let mut order: Vec<usize> = Vec::new();

    let started = Instant::now();
    ctx.start("judge", Some(steps));
    let mut last_loss = f64::NAN;
    for step in 1..=steps {
        ctx.check_cancelled()?;
        if order.len() < batch {
            order = (0..n_train).collect();
            order.shuffle(&mut rng);
        }
        let idx = order.split_off(order.len() - batch);
        let (xs, ys) = ds.batch_f32(Split::Train, &idx)?;
        let x = Tensor::from_vec(xs, (batch, c, h, w), device)?;
        let y = Tensor::from_vec(ys, batch, device)?;
        let loss = candle_nn::loss::cross_entropy(&judge.logits(&judge.features(&x)?)?, &y)?;
        last_loss = loss.to_scalar::<f32>()? as f64;
        if !last_loss.is_finite() {
            bail!("the judge's loss became {last_loss} at step {step}: try a lower --lr");
        }
        let grads = loss.backward()?;
        adam.begin_step();
        let lr = lr_at(step, steps, (steps / 20).min(100), peak, 0.0);
        for ((name, p), (var, m)) in params.iter_mut().zip(vars.iter().zip(moments.iter_mut())) {
            let g = grads.get(var).with_context(|| format!("no gradient reached {name}"))?;
            let g = g.flatten_all()?.to_vec1::<f32>()?;
            adam.update(&mut p.data, &g, m, lr, 1.0, name.ends_with(".weight"));
            var.set(&Tensor::from_slice(&p.data, p.shape.clone(), device)?)?;
        }
        if step % 10 == 0 || step == steps {
            ctx.progress(step, Some(steps), crate::metrics!["loss" => last_loss]);
        }
    }
    ctx.end();
    let train_seconds = started.elapsed().as_secs_f64();
    let held_out = ds.len(Split::Val);
    let acc = judge_dataset(&judge, &ds, Split::Val, held_out, "held-out accuracy", device, ctx)?.label_accuracy().unwrap_or(0.0);

    let mut file = JudgeFile::new(config);
    file.held_out_accuracy = acc;
    file.held_out_count = held_out;
    file.floor = floor;
    file.data = o.data.clone();
    file.data_checksum = ds.manifest.checksum.value.clone();
    file.class_names = ds.manifest.classes.iter().map(|c| c.name.clone()).collect();
    file.steps = steps;
    file.batch_size = batch;
    file.seed = o.seed;
    file.train_seconds = train_seconds;
    write_judge(&out, &file, &params, o.force)?;
    if acc < floor {
        ctx.message(format!(
            "the judge reached only {:.1}% held-out accuracy, below its floor of {:.1}%: eval-quality will refuse it (train longer, or choose --min-accuracy)",
            100.0 * acc,
            100.0 * floor
        ));
    }
    Ok(json!({
        "out": out.display().to_string(),
        "heldOutAccuracy": acc,
        "heldOutCount": held_out,
        "floor": floor,
        "usable": acc >= floor,
        "loss": last_loss,
        "steps": steps,
        "seconds": train_seconds,
        "parameters": params.iter().map(|(_, t)| t.data.len()).sum::<usize>(),
    }))
}

/// Write J whole or not at all: a sibling temp folder, renamed into place.
fn write_judge(out: &Path, file: &JudgeFile, params: &[(String, HostTensor)], force: bool) -> Result<()> {
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "judge".into());
    let tmp = out.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let written = (|| -> Result<()> {
        std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        save_weights(&tmp, params)?;
        crate::io::atomic::write(&tmp.join(JUDGE_FILE), serde_json::to_string_pretty(file)?.as_bytes())?;
        if out.exists() {
            ensure!(force || std::fs::read_dir(out)?.next().is_none(), "{} appeared while the judge trained", out.display());
            std::fs::remove_dir_all(out).with_context(|| format!("cannot replace {}", out.display()))?;
        }
        std::fs::rename(&tmp, out).with_context(|| format!("cannot move the judge into {}", out.display()))
    })();
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    written
}
