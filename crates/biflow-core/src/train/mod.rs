//! The one training machinery: `train` (F by maximum likelihood) and `distill` (G by the BiFlow
//! losses) each hand [`fit`] their parameters and an [`Objective`]; everything else is here.
//!
//! One step: a batch in the epoch's seeded order, the objective's loss and gradients, global-norm
//! clipping, AdamW (host-side state, see optim.rs) under warmup + cosine, EMA.
//!
//! Everything a step depends on is in the checkpoint: weights, EMA, AdamW moments and step count, the
//! data position (epoch, offset; the epoch's order is a function of the seed and the epoch), and the
//! host RNG (ChaCha8 seed, stream, word position) that the objective draws noise and label drops
//! from. So a resumed run repeats the uninterrupted one bit for bit on the same machine and thread
//! count.

mod checkpoint;
mod data;
mod lock;
pub mod optim;
mod plot;
mod preview;

use std::fs;
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Map, Value};

pub use checkpoint::{load_checkpoint, slots_of, CheckpointState, LoadedCheckpoint, RngState, Slot};
pub use data::{open_data, DataPos, Limited, MemData, TrainData};
pub use lock::{host_name, lock_holder, pid_alive, record_history, write_status, RunLock, HISTORY_FILE, LOCK_FILE, STATUS_FILE};
pub use preview::{ema_varbuilder, preview_noise, preview_path, PREVIEW_COUNT, SAMPLES_DIR};
pub use plot::{chart_png, chart_svg, plot_loss, series, smooth, throughput};

use crate::job::{Cancelled, JobCtx};
use optim::{AdamW, AdamWConfig};
use crate::run::{Checkpoint, Run};
use checkpoint::{restore_slots, rng_restore, rng_state, save_checkpoint, TrainState};
use data::Loader;

/// The optimisation settings both trainers share (stored flat in a run's options).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Schedule {
    pub batch_size: usize,
    pub steps: u64,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup: u64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    /// Global gradient-norm clip (0: off).
    pub grad_clip: f64,
    pub ema_decay: f64,
    pub seed: u64,
    pub save_every: u64,
    pub keep: usize,
    /// Write a preview grid every N steps (0: never).
    #[serde(default)]
    pub sample_every: u64,
}

/// One step of an objective: its loss, metrics to log next to it, and the gradient of every slot
/// (in slot order).
pub struct StepOutput {
    pub loss: f64,
    pub metrics: Map<String, Value>,
    pub grads: Vec<Vec<f32>>,
}

/// The slots' names and sizes: the parameter list a hand-written gradient (engines/) is built for.
pub fn slot_layout(slots: &[Slot]) -> (Vec<String>, Vec<usize>) {
    slots.iter().map(|s| (s.name.clone(), s.value.len())).unzip()
}

/// A loss to minimise over batches of training images.
pub trait Objective {
    /// Loss and gradients for one batch of clean images (N*C*H*W in [-1,1]) and labels. All
    /// randomness (noise, label drops, guidance scales) comes from `rng`, which checkpoints restore.
    fn step(&mut self, slots: &[Slot], images: Vec<f32>, labels: Vec<i64>, rng: &mut ChaCha8Rng) -> Result<StepOutput>;

    /// Whether the objective reads the parameters through the slots' candle variables (autograd),
    /// which the trainer then refreshes after every update.
    fn reads_vars(&self) -> bool;

    /// Samples (N, C, H, W) from the fixed preview noise with the slots' EMA weights, for
    /// `--sample-every` (see preview.rs); None where the objective cannot sample.
    fn preview(&self, _slots: &[Slot]) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

/// What [`fit`] trains, where, and from which checkpoint.
pub struct Fit<'a> {
    pub run: &'a Run,
    /// The run's writer lock, taken before the run folder was created or changed (see lock.rs).
    pub lock: &'a RunLock,
    pub data: &'a dyn TrainData,
    pub schedule: Schedule,
    /// The job's resolved options and the model's configuration, recorded in every checkpoint.
    pub options: Value,
    pub model: Value,
    pub slots: Vec<Slot>,
    /// Continue from this checkpoint (already checked against the run by the job).
    pub resume: Option<(Checkpoint, LoadedCheckpoint)>,
    /// The progress phase shown to the user ("train", "distill").
    pub phase: &'static str,
    /// Testing hook: pretend the loss is NaN at this step.
    pub debug_nan_at_step: Option<u64>,
    /// The command line that started this session (recorded in RUN/history.jsonl for the report).
    pub command: Option<String>,
    /// A latent run's VAE: previews are its decoding of the sampled latents.
    pub decoder: Option<crate::models::vae::Vae>,
}

/// The outcome of [`fit`]; `result` is the JSON the job returns, to which it may add.
pub struct Fitted {
    pub slots: Vec<Slot>,
    pub result: Map<String, Value>,
}

/// Train until `schedule.steps`, checkpointing, logging and reporting progress; stop cleanly on
/// Ctrl-C (a checkpoint first) and on a non-finite loss or gradient (the last good checkpoint kept).
pub fn fit(f: Fit, objective: &mut dyn Objective, ctx: &JobCtx) -> Result<Fitted> {
    let (dir, total) = (f.run.dir.clone(), f.schedule.steps);
    debug_assert_eq!(f.lock.dir(), dir.as_path());
    let last_step = std::cell::Cell::new(0u64);
    let _ = write_status(&dir, "running", 0, total, None);
    let outcome = fit_inner(f, objective, ctx, &last_step);
    let step = last_step.get();
    let _ = match &outcome {
        Ok(_) => write_status(&dir, "complete", step, total, None),
        Err(e) if e.is::<Cancelled>() => write_status(&dir, "interrupted", step, total, None),
        Err(e) => write_status(&dir, "failed", step, total, Some(&format!("{e:#}"))),
    };
    outcome
}

fn fit_inner(f: Fit, objective: &mut dyn Objective, ctx: &JobCtx, last_step: &std::cell::Cell<u64>) -> Result<Fitted> {
    let Fit { run, lock: _, data, schedule: s, options, model, mut slots, resume, phase: phase_name, debug_nan_at_step, command, decoder } = f;
    // The model's device (the slots' host copies hold the master weights and optimizer state).
    let device = slots.first().map(|s| s.var.device().clone()).unwrap_or(Device::Cpu);
    let mut adam = AdamW::new(AdamWConfig { beta1: s.beta1, beta2: s.beta2, eps: 1e-8, weight_decay: s.weight_decay });
    let mut loader = Loader::new(s.seed, data.len(), s.batch_size);
    let mut rng = ChaCha8Rng::seed_from_u64(s.seed);
    rng.set_stream(1);
    let mut step = 0u64;
    let mut elapsed_before = 0.0;
    let mut last_loss = None;
    if let Some((ck, loaded)) = &resume {
        restore_slots(&mut slots, loaded, &device).with_context(|| format!("cannot resume from {}", ck.dir.display()))?;
        adam.t = loaded.state.adam_steps;
        loader.pos = loaded.state.data;
        rng = rng_restore(&loaded.state.rng)?;
        step = loaded.state.step;
        elapsed_before = loaded.state.elapsed_secs;
        last_loss = loaded.state.loss;
        plot::rewrite_metrics_up_to(&run.metrics_path(), step)?;
        ctx.message(format!("resuming {} from step {step}", run.dir.display()));
    }
    last_step.set(step);
    if step >= s.steps {
        bail!("the run is already at step {step} of {}; pass a larger --steps to train further", s.steps);
    }
    record_history(&run.dir, command.as_deref(), step)?;
    let mut metrics_file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(run.metrics_path())
        .with_context(|| format!("cannot open {}", run.metrics_path().display()))?;

    let (c, hgt, wid) = data.shape();
    let per_image = c * hgt * wid;
    let total = s.steps;
    let start_step = step;
    let started = Instant::now();
    let mut last_saved = resume.as_ref().map(|(c, _)| c.step);
    let mut last_ckpt: Option<Checkpoint> = resume.as_ref().map(|(c, _)| c.clone());
    let mut last_report = Instant::now() - Duration::from_secs(1);
    let mut last_metrics = Map::new();
    // Where the time goes (seconds, this session): batch assembly, loss and gradients, optimiser, checkpoints, previews.
    let mut phase = [0f64; 5];

    ctx.start(phase_name, Some(total - start_step));
    macro_rules! save {
        ($step:expr) => {
            save_checkpoint(
                $step,
                &TrainState {
                    run,
                    options: &options,
                    model: &model,
                    keep: s.keep,
                    slots: &slots,
                    adam: &adam,
                    data: loader.pos,
                    rng: rng_state(s.seed, &rng),
                    loss: last_loss,
                    elapsed: elapsed_before + started.elapsed().as_secs_f64(),
                },
            )
        };
    }

    while step < total {
        if ctx.is_cancelled() {
            ctx.end();
            if last_saved != Some(step) {
                let ck = save!(step)?;
                ctx.message(format!("interrupted at step {step}: checkpoint written to {}", ck.dir.display()));
            } else if let Some(ck) = &last_ckpt {
                ctx.message(format!("interrupted at step {step}: the latest checkpoint is {}", ck.dir.display()));
            }
            let _ = plot_loss(&run.metrics_path(), &run.loss_png_path());
            return Err(Cancelled.into());
        }

        let t0 = Instant::now();
        let idx = loader.next_indices();
        let (xs, ys) = data.batch(&idx)?;
        if xs.len() != per_image * idx.len() {
            bail!("the dataset returned {} values for {} images of {c}x{hgt}x{wid}", xs.len(), idx.len());
        }
        let t1 = Instant::now();
        let out = objective.step(&slots, xs, ys, &mut rng)?;
        let loss = if debug_nan_at_step == Some(step + 1) { f64::NAN } else { out.loss };
        if !loss.is_finite() {
            ctx.end();
            return Err(non_finite_stop("loss", loss, step + 1, last_ckpt.as_ref()));
        }
        let t2 = Instant::now();
        let gnorm = optim::global_norm(out.grads.iter().map(|g| g.as_slice()));
        if !gnorm.is_finite() {
            ctx.end();
            return Err(non_finite_stop("gradient norm", gnorm, step + 1, last_ckpt.as_ref()));
        }
        step += 1;
        let lr = optim::lr_at(step, total, s.warmup, s.lr, s.min_lr);
        let scale = optim::clip_scale(gnorm, s.grad_clip);
        adam.begin_step();
        let ema_d = optim::ema_decay_at(step, s.ema_decay);
        for (slot, g) in slots.iter_mut().zip(&out.grads) {
            adam.update(&mut slot.value, g, &mut slot.mom, lr, scale, slot.decay);
            optim::ema_update(&mut slot.ema, &slot.value, ema_d);
        }
        if objective.reads_vars() {
            checkpoint::upload_slots(&slots, &device)?;
        }
        last_loss = Some(loss);
        last_step.set(step);
        last_metrics = out.metrics;
        let t3 = Instant::now();
        phase[0] += (t1 - t0).as_secs_f64();
        phase[1] += (t2 - t1).as_secs_f64();
        phase[2] += (t3 - t2).as_secs_f64();

        let mut line = Map::new();
        line.insert("step".into(), json!(step));
        line.insert("loss".into(), json!(loss));
        line.extend(last_metrics.clone());
        line.insert("lr".into(), json!(lr));
        line.insert("gradNorm".into(), json!(gnorm));
        line.insert("epoch".into(), json!(loader.pos.epoch));
        line.insert("time".into(), json!(elapsed_before + started.elapsed().as_secs_f64()));
        writeln!(metrics_file, "{}", Value::Object(line)).context("cannot append to metrics.jsonl")?;

        if step % s.save_every == 0 || step == total {
            let tc = Instant::now();
            last_ckpt = Some(save!(step)?);
            last_saved = Some(step);
            phase[3] += tc.elapsed().as_secs_f64();
        }
        if s.sample_every > 0 && (step % s.sample_every == 0 || step == total) {
            let tp = Instant::now();
            if let Some(x) = objective.preview(&slots)? {
                let images = match &decoder {
                    Some(vae) => vae.images(&x)?,
                    None => x,
                };
                preview::write_preview(&run.dir, step, &images)?;
            }
            phase[4] += tp.elapsed().as_secs_f64();
        }
        let now = Instant::now();
        if step - start_step <= 20 || now.duration_since(last_report).as_secs_f64() >= 0.1 || step == total {
            last_report = now;
            let sps = (step - start_step) as f64 / started.elapsed().as_secs_f64().max(1e-9);
            let eta = (total - step) as f64 / sps.max(1e-9);
            let mut m = crate::metrics!["step" => step, "loss" => loss];
            m.extend(last_metrics.clone());
            m.extend(crate::metrics!["lr" => lr, "gradNorm" => gnorm, "stepsPerSec" => sps,
                "imagesPerSec" => sps * s.batch_size as f64, "etaSecs" => eta.round()]);
            ctx.progress(step - start_step, Some(total - start_step), m);
        }
    }
    ctx.end();
    plot_loss(&run.metrics_path(), &run.loss_png_path())?;
    let secs = started.elapsed().as_secs_f64();
    let sps = (step - start_step) as f64 / secs.max(1e-9);
    let mut result = crate::metrics![
        "run" => run.dir,
        "steps" => step,
        "resumedFrom" => resume.as_ref().map(|(c, _)| c.step),
        "loss" => last_loss,
    ];
    result.extend(last_metrics);
    result.extend(crate::metrics![
        "lastCheckpoint" => last_ckpt.as_ref().map(|c| c.dir.clone()),
        "weights" => run.weights_path(),
        "metrics" => run.metrics_path(),
        "lossPlot" => run.loss_png_path(),
        "stepsPerSec" => sps,
        "imagesPerSec" => sps * s.batch_size as f64,
        "seconds" => secs,
        "parameters" => slots.iter().map(|s| s.value.len()).sum::<usize>(),
        "phaseSeconds" => json!({"data": phase[0], "lossAndGradients": phase[1], "optimizer": phase[2], "checkpoints": phase[3], "previews": phase[4]}),
    ]);
    Ok(Fitted { slots, result })
}

/// The error that stops a run whose loss or gradient norm stopped being finite at `step`.
fn non_finite_stop(what: &str, value: f64, step: u64, last: Option<&Checkpoint>) -> anyhow::Error {
    let keep = match last {
        Some(c) => format!("the last good checkpoint is {}", c.dir.display()),
        None => "no checkpoint was written before it".to_string(),
    };
    anyhow!("training stopped: the {what} became {value} at step {step}; {keep} (try a lower --lr, or --clip-scale)")
}

/// On resume: every option the user gave (`given`, camelCase) must equal the run's (`saved`),
/// except the `resumable` ones. A given 0 matches a saved null for the keys in `zero_is_off`.
pub fn check_resume_options(given: &Map<String, Value>, saved: &Map<String, Value>, resumable: &[&str], zero_is_off: &[&str]) -> Result<()> {
    let mut problems = Vec::new();
    for (k, v) in given {
        if resumable.contains(&k.as_str()) || v.is_null() {
            continue;
        }
        let s = saved.get(k).cloned().unwrap_or(Value::Null);
        let same = match (v.as_f64(), s.as_f64()) {
            (Some(a), Some(b)) => a == b,
            _ => *v == s || (zero_is_off.contains(&k.as_str()) && v.as_f64() == Some(0.0) && s.is_null()),
        };
        if !same {
            problems.push(format!("{k} = {s} in the run, {v} asked for"));
        }
    }
    if !problems.is_empty() {
        bail!(
            "--resume: the options do not match the run being resumed ({}); drop them to continue the run as it was, or start a new run",
            problems.join("; ")
        );
    }
    Ok(())
}
