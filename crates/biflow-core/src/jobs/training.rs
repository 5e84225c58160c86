//! The job shell that `train` and `distill` share, written once: one writer per run (the lock),
//! resume (the run's own options are the base and the user's are checked against them), a new run
//! or the resumed one with its newest checkpoint, the backend, the one trainer
//! ([`crate::train::fit`]), and the run's report afterwards. A job brings its objective and how its
//! settings resolve ([`TrainingJob`]).

use std::path::PathBuf;

use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::Device;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::data::LatentInfo;
use crate::device::mode::Backend;
use crate::jobs::options;
use crate::jobs::options::DeviceArgs;
use crate::job::JobCtx;
use crate::run::{Run, RunConfig};
use crate::train::{self, load_checkpoint, Fit, Limited, Objective, RunLock, Schedule, Slot, TrainData};

crate::options! {
    /// What every training session is given besides the job's own settings.
    pub struct SessionOptions {
        /// run folder to create (or to continue with --resume)
        out: String,
        /// continue the run in --out from its newest checkpoint
        resume: bool,
        /// testing hook: pretend the loss is NaN at this step
        debug_nan_at_step: Option<u64>,
        /// the command line, recorded in RUN/history.jsonl
        command_line: Option<String>,
    }
}

/// A training session: [`SessionOptions`] and where it runs.
#[derive(Clone, Debug, Default)]
pub struct SessionArgs {
    /// The run folder to create, or to continue with `resume`.
    pub out: PathBuf,
    pub resume: bool,
    pub debug_nan_at_step: Option<u64>,
    pub command: Option<String>,
    /// `--device` and `--precision`: where this session runs (not part of the run's config).
    pub on: DeviceArgs,
}

impl SessionArgs {
    /// Split a job's JSON options (camelCase) into the session's arguments and the job's settings.
    pub fn split(job: &str, options: Value) -> Result<(SessionArgs, Map<String, Value>)> {
        let Value::Object(mut map) = options else { bail!("{job} options must be an object") };
        let on = DeviceArgs::take(&mut map)?;
        ensure!(map.get("out").is_some_and(|v| !v.is_null()), "{job} needs --out RUN (the run folder)");
        let o: SessionOptions = options::take(&mut map, job)?;
        map.retain(|_, v| !v.is_null());
        Ok((SessionArgs { out: PathBuf::from(o.out), resume: o.resume, debug_nan_at_step: o.debug_nan_at_step, command: o.command_line, on }, map))
    }
}

/// What a training job adds to the shell: how its settings resolve, its run, its objective.
pub trait TrainingJob {
    /// The resolved options, stored in RUN/config.json under "train".
    type Options: Serialize + DeserializeOwned + PartialEq;
    /// The trained model's configuration, recorded in every checkpoint.
    type Model: Serialize;
    /// The job's name, also its progress phase ("train", "distill").
    const NAME: &'static str;
    /// What `--resume` needs as `--out`, for the error ("an existing run folder").
    const RESUMES: &'static str;

    /// On resume, check the user's settings against the run's and take the run's as the base.
    /// Returns the `--limit` that applies to the data.
    fn settle(&mut self, resumed: Option<&Run>) -> Result<Option<usize>>;
    /// The options and model for this (limited) data, on `device`.
    fn resolve(&mut self, data: &dyn TrainData, device: &Device) -> Result<(Self::Options, Self::Model)>;
    fn schedule(opts: &Self::Options) -> &Schedule;
    /// A resumed run must describe this model.
    fn check_model(run: &Run, model: &Self::Model) -> Result<()>;
    /// The configuration of a new run.
    fn new_run(&self, opts: &Self::Options, model: &Self::Model) -> Result<RunConfig>;
    /// The trainable parameters (seeded) and the objective that trains them.
    fn objective(&mut self, opts: Self::Options, model: &Self::Model, device: &Device, backend: Backend) -> Result<(Vec<Slot>, Box<dyn Objective>)>;
    /// What the job adds to its result.
    fn finish(&self, _result: &mut Map<String, Value>) {}
}

/// Run a training session of `job` on `data`: a new run in `args.out`, or continue it.
pub fn drive<J: TrainingJob>(mut job: J, args: &SessionArgs, data: &dyn TrainData, ctx: &JobCtx) -> Result<Value> {
    let on = args.on.place()?;
    let device = on.device.clone();
    let open = || Run::open(&args.out).with_context(|| format!("--resume needs {} as --out", J::RESUMES));
    if args.resume {
        open()?;
    }
    // One writer per run: taken before anything in the folder is created or changed.
    let lock = RunLock::acquire(&args.out, ctx)?;
    let prior = if args.resume { Some(open()?) } else { None };
    if let Some(run) = &prior {
        let name = format!("--resume: the run {}", run.dir.display());
        crate::data::latent::check_same_space(run.config.latent.as_ref(), &name, data.latent(), "the data")?;
    }
    let limit = job.settle(prior.as_ref())?;
    let limited;
    let data: &dyn TrainData = match limit {
        Some(l) if l > 0 && l < data.len() => {
            limited = Limited { inner: data, limit: l };
            &limited
        }
        _ => data,
    };
    let (opts, model) = job.resolve(data, &device)?;

    // A latent run's previews are decoded to images by its VAE: found (and checked) before the
    // run folder is made.
    let decoder = match (J::schedule(&opts).sample_every, data.latent()) {
        (0, _) | (_, None) => None,
        (_, Some(info)) => Some(crate::data::latent::load_vae(info, None, "training on this latent dataset", "put it back to see previews, or train with --sample-every 0", &device)?),
    };
    // The run folder: the one being resumed with its newest checkpoint, or a new one.
    let (run, resume) = match prior {
        Some(mut run) => {
            J::check_model(&run, &model)?;
            run.sweep_temporaries()?;
            let ck = run.latest_checkpoint()?.ok_or_else(|| anyhow!("--resume: {} has no checkpoint to resume from", run.dir.display()))?;
            let loaded = load_checkpoint(&ck)?;
            ensure!(
                loaded.state.model == serde_json::to_value(&model)?,
                "checkpoint {} was written for another model than the run's config.json",
                ck.dir.display()
            );
            if serde_json::from_value::<J::Options>(run.config.train.clone()).ok().as_ref() != Some(&opts) {
                run.config.train = serde_json::to_value(&opts)?;
                run.write_config()?;
            }
            (run, Some((ck, loaded)))
        }
        None => {
            let mut config = job.new_run(&opts, &model)?;
            config.latent = data.latent().map(|l| LatentInfo { vae: crate::data::latent::recorded_path(&l.vae), ..l.clone() });
            (Run::create(&args.out, config)?, None)
        }
    };


    let schedule = J::schedule(&opts).clone();
    let options = serde_json::to_value(&opts)?;
    let (slots, mut objective) = job.objective(opts, &model, &device, Backend::of(&device))?;
    let fit = Fit {
        run: &run,
        lock: &lock,
        data,
        schedule,
        options,
        model: serde_json::to_value(&model)?,
        slots,
        resume,
        phase: J::NAME,
        debug_nan_at_step: args.debug_nan_at_step,
        command: args.command.clone(),
        decoder,
    };
    let mut result = train::fit(fit, objective.as_mut(), ctx)?.result;
    // The run's report (no comparison sampling here; `biflow report` and `biflow demo` add it).
    match crate::jobs::report::write_default(&run.dir) {
        Ok(p) => {
            result.insert("report".into(), json!(p));
        }
        Err(e) => ctx.message(format!("the report could not be written: {e:#}")),
    }
    job.finish(&mut result);
    Ok(Value::Object(result))
}

/// The [`Schedule`] of a training job's settings `$s` (a `settings!` struct with the defaults
/// applied): the knobs both jobs share are read from it; batch size, steps, learning rates and
/// warmup are given, as their defaults differ by job. AdamW's betas are the reference's.
macro_rules! schedule_of {
    ($s:expr, batch_size: $batch:expr, steps: $steps:expr, lr: $lr:expr, min_lr: $min_lr:expr, warmup: $warmup:expr) => {
        $crate::train::Schedule {
            batch_size: $batch,
            steps: $steps,
            lr: $lr,
            min_lr: $min_lr,
            warmup: $warmup,
            weight_decay: given(&$s.weight_decay),
            beta1: 0.9,
            beta2: 0.95,
            grad_clip: given(&$s.grad_clip),
            ema_decay: given(&$s.ema_decay),
            seed: given(&$s.seed),
            save_every: given(&$s.save_every).max(1),
            keep: given(&$s.keep).max(1),
            sample_every: given(&$s.sample_every),
        }
    };
}
pub(crate) use schedule_of;
