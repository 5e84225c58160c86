//! The napi-rs shell: JS calls `runJob(name, optionsJson, onEvent, token)`; the job runs on the
//! libuv thread pool, its events reach `onEvent` as JSON strings, and `token.cancel()` asks it to
//! stop at its next safe point. No maths lives here.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use napi::bindgen_prelude::*;
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi_derive::napi;

use biflow_core::{Cancelled, JobCtx};

/// A panic becomes a JS Error carrying its message (see `Job::compute`); the default hook would also
/// print it, so print only when a backtrace was asked for.
#[napi_derive::module_init]
fn quiet_panics() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::env::var_os("RUST_BACKTRACE").is_some() {
            default_hook(info);
        }
    }));
}

/// Set from JS to cancel the job it was passed to.
#[napi]
pub struct CancelToken {
    flag: Arc<AtomicBool>,
}

#[napi]
impl CancelToken {
    #[napi(constructor)]
    pub fn new() -> Self {
        CancelToken { flag: Arc::new(AtomicBool::new(false)) }
    }

    #[napi]
    pub fn cancel(&self) {
        self.flag.store(true, Ordering::Relaxed);
    }
}

type EventCallback = ThreadsafeFunction<String, (), String, Status, false>;

pub struct Job {
    name: String,
    options: String,
    on_event: Option<Arc<EventCallback>>,
    cancel: Arc<AtomicBool>,
}

/// Sends the `closed` event when the job is over, then releases the callback: a live threadsafe
/// function would keep Node from exiting.
struct ClosedOnDrop(Arc<EventCallback>);

impl Drop for ClosedOnDrop {
    fn drop(&mut self) {
        self.0.call(r#"{"type":"closed"}"#.to_string(), ThreadsafeFunctionCallMode::Blocking);
    }
}

impl Task for Job {
    type Output = String;
    type JsValue = String;

    fn compute(&mut self) -> Result<String> {
        // Events and the result travel on different queues; the last event tells JS that every
        // earlier one was delivered, whatever happens below.
        let _closed = self.on_event.take().map(|cb| ClosedOnDrop(cb));
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let options: serde_json::Value = serde_json::from_str(&self.options)?;
            let sink = _closed.as_ref().map(|c| c.0.clone());
            let ctx = JobCtx::new(
                move |event| {
                    if let (Some(cb), Ok(json)) = (&sink, serde_json::to_string(&event)) {
                        cb.call(json, ThreadsafeFunctionCallMode::Blocking);
                    }
                },
                self.cancel.clone(),
            );
            biflow_core::jobs::run(&self.name, options, &ctx)
        }));
        match outcome {
            Ok(Ok(value)) => Ok(value.to_string()),
            Ok(Err(e)) if e.is::<Cancelled>() => Err(Error::new(Status::Cancelled, "cancelled")),
            Ok(Err(e)) => Err(Error::new(Status::GenericFailure, format!("{e:#}"))),
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                Err(Error::new(Status::GenericFailure, format!("internal error (panic): {msg}")))
            }
        }
    }

    fn resolve(&mut self, _env: Env, output: String) -> Result<String> {
        Ok(output)
    }
}

/// Run the core job `name` with JSON options; resolves to the job's JSON result.
#[napi(ts_return_type = "Promise<string>")]
pub fn run_job(
    name: String,
    options_json: String,
    #[napi(ts_arg_type = "(eventJson: string) => void")] on_event: Option<EventCallback>,
    token: Option<&CancelToken>,
) -> AsyncTask<Job> {
    AsyncTask::new(Job {
        name,
        options: options_json,
        on_event: on_event.map(Arc::new),
        cancel: token.map(|t| t.flag.clone()).unwrap_or_default(),
    })
}

/// The version of the native core, to check that the addon matches the CLI.
#[napi]
pub fn core_version() -> String {
    env!("CARGO_PKG_VERSION").to_string()
}

/// The options of a core job as JSON (`[{key, kind, help, default, choices}]`): the CLI builds its
/// flags and `--help` from them.
#[napi]
pub fn option_specs(job: String) -> Result<String> {
    let specs = biflow_core::jobs::option_specs(&job).map_err(|e| Error::from_reason(format!("{e:#}")))?;
    serde_json::to_string(&specs).map_err(|e| Error::from_reason(e.to_string()))
}

/// Every file a model bundle may hold (JSON list of paths), for the CLI's check of a bundle's
/// entries before it unpacks anything.
#[napi]
pub fn bundle_files() -> String {
    let files: Vec<&str> = std::iter::once(biflow_core::jobs::bundle::MANIFEST).chain(biflow_core::jobs::bundle::ALLOWED.iter().copied()).collect();
    serde_json::to_string(&files).expect("a list of strings")
}
