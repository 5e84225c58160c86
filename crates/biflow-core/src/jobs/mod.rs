//! The table of jobs the CLI can run. Each job takes its options as JSON (camelCase keys, the
//! same names as the CLI flags) and returns a JSON result that `--json` prints.

pub mod bundle;
pub mod demo;
pub mod distill;
pub mod edit;
pub mod import;
pub mod options;
pub mod report;
pub mod runs;
pub mod sample;
pub mod training;
pub mod train;
pub mod vae;

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::job::JobCtx;
pub use options::DeviceArgs;
use options::Declared;

fn opts<T: DeserializeOwned>(name: &str, options: Value) -> Result<T> {
    serde_json::from_value(options).with_context(|| format!("invalid options for job '{name}'"))
}

/// A job's declared options (see [`crate::options!`]): the required ones must be there.
fn declared<T: DeserializeOwned + Declared>(name: &str, options: Value) -> Result<T> {
    if let Value::Object(map) = &options {
        options::check_required::<T>(map, &format!("job '{name}'"))?;
    }
    opts(name, options)
}

/// Run a job that takes its declared options and, taken out of them, where it runs (`device`,
/// `precision`).
fn placed<T: DeserializeOwned + Declared>(
    name: &str,
    options: Value,
    ctx: &JobCtx,
    job: fn(T, &DeviceArgs, &JobCtx) -> Result<Value>,
) -> Result<Value> {
    let Value::Object(mut map) = options else { bail!("invalid options for job '{name}': not an object") };
    let on = DeviceArgs::take(&mut map)?;
    job(declared(name, Value::Object(map))?, &on, ctx)
}

/// The options of the job called `name` as the CLI shows them (jobs that declare them with
/// [`crate::options!`] or [`crate::settings!`]).
pub fn option_specs(name: &str) -> Result<Vec<options::OptionSpec>> {
    Ok(match name {
        "train" => [training::SessionOptions::specs(), train::ConfigFile::specs(), train::TrainSettings::specs()].concat(),
        "distill" => [training::SessionOptions::specs(), distill::DistillSettings::specs()].concat(),
        "sample" => sample::SampleOptions::specs(),
        "edit" => edit::EditOptions::specs(),
        "eval-reverse" => crate::eval::reverse::EvalReverseOptions::specs(),
        "fid.eval" => crate::eval::fid::eval::EvalOptions::specs(),
        "eval-quality" => crate::eval::judge::quality::QualityOptions::specs(),
        "judge.train" => crate::eval::judge::train::JudgeTrainOptions::specs(),
        "report" => report::ReportOptions::specs(),
        "eval-bpd" => crate::eval::bpd::BpdOptions::specs(),
        "data.prepare" => crate::data::prepare::PrepareOptions::specs(),
        "data.inspect" => crate::data::inspect::InspectOptions::specs(),
        "import-tarflow" => import::ImportOptions::specs(),
        "runs" => runs::RunsOptions::specs(),
        "demo" => demo::DemoOptions::specs(),
        "device" => DeviceArgs::specs(),
        "lpips" => crate::eval::lpips::LpipsOptions::specs(),
        "echo" => EchoOptions::specs(),
        "fid.convertWeights" => crate::eval::fid::eval::ConvertOptions::specs(),
        "fid.formulaWeights" => crate::eval::fid::eval::FormulaOptions::specs(),
        "export" => bundle::ExportOptions::specs(),
        "import-bundle" => bundle::ImportBundleOptions::specs(),
        "vae.encode" => vae::VaeEncodeOptions::specs(),
        "vae.decode" => vae::VaeDecodeOptions::specs(),
        _ => bail!("job '{name}' declares no options"),
    })
}

/// Run the job called `name`.
pub fn run(name: &str, options: Value, ctx: &JobCtx) -> Result<Value> {
    match name {
        "echo" => echo(declared(name, options)?, ctx),
        "data.prepare" => placed(name, options, ctx, crate::data::prepare),
        "data.inspect" => crate::data::inspect(declared(name, options)?, ctx),
        "data.synth" => crate::data::bench::synth(opts(name, options)?),
        "data.benchRead" => crate::data::bench::bench_read(opts(name, options)?),
        "fid.eval" => placed(name, options, ctx, crate::eval::fid::eval::eval),
        "fid.convertWeights" => crate::eval::fid::eval::convert_weights(declared(name, options)?, ctx),
        "fid.formulaWeights" => crate::eval::fid::eval::formula_weights(declared(name, options)?, ctx),
        "train" => crate::jobs::train::train_job(options, ctx),
        "distill" => crate::jobs::distill::distill_job(options, ctx),
        "eval-reverse" => placed(name, options, ctx, crate::eval::reverse::eval_reverse),
        "edit" => placed(name, options, ctx, crate::jobs::edit::edit),
        "import-tarflow" => crate::jobs::import::import_tarflow(declared(name, options)?, ctx),
        "sample" => placed(name, options, ctx, crate::jobs::sample::sample),
        "judge.train" => placed(name, options, ctx, crate::eval::judge::train::judge_train),
        "eval-quality" => placed(name, options, ctx, crate::eval::judge::quality::eval_quality),
        "eval-bpd" => placed(name, options, ctx, crate::eval::bpd::eval_bpd),
        "lpips" => placed(name, options, ctx, crate::eval::lpips::lpips),
        "vae.encode" => placed(name, options, ctx, crate::jobs::vae::encode),
        "vae.decode" => placed(name, options, ctx, crate::jobs::vae::decode),
        "lpips.formulaWeights" => crate::eval::lpips::formula_weights(declared(name, options)?, ctx),
        "runs" => crate::jobs::runs::runs(declared(name, options)?),
        "doctor" => Ok(crate::device::doctor()),
        "demo" => crate::jobs::demo::demo(declared(name, options)?, ctx),
        "report" => crate::jobs::report::report(declared(name, options)?, ctx),
        "export" => crate::jobs::bundle::stage(declared(name, options)?, ctx),
        "import-bundle" => crate::jobs::bundle::install(declared(name, options)?, ctx),
        _ => bail!("unknown job '{name}'"),
    }
}

crate::options! {
    pub struct EchoOptions {
        /// number of steps to count
        steps: u64 = 20,
        /// milliseconds per step
        sleep_ms: u64 = 10,
        /// make the job fail with this message
        fail: Option<String>,
        /// make the job panic (the panic must become an error)
        panic: bool,
    }
}

/// A self-test of the bridge: counts to `steps` with progress, can fail, panic or be cancelled.
fn echo(o: EchoOptions, ctx: &JobCtx) -> Result<Value> {
    ctx.start("echo", Some(o.steps));
    for i in 1..=o.steps {
        ctx.check_cancelled()?;
        std::thread::sleep(std::time::Duration::from_millis(o.sleep_ms));
        ctx.progress(i, Some(o.steps), crate::metrics!["i" => i]);
    }
    ctx.end();
    if o.panic {
        panic!("echo job asked to panic");
    }
    if let Some(msg) = o.fail {
        bail!(msg);
    }
    Ok(serde_json::json!({ "steps": o.steps }))
}
