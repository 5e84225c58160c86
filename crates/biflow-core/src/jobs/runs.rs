//! `biflow runs [DIR]`: the runs under a folder, each with its kind, status, progress, best
//! bits/dim, last checkpoint and whether it can be resumed. Read-only: it never takes a run's lock.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Result};
use serde_json::{json, Value};

use crate::run::{Run, CONFIG_FILE};
use crate::train::{lock_holder, STATUS_FILE};

crate::options! {
    pub struct RunsOptions {
        /// folder holding runs (or a run folder itself)
        dir: String = ".",
        /// how many folder levels below DIR to search
        depth: usize = 3,
    }
}


/// The run folders at or under `dir` (a run's own subfolders are not searched, except `forward/`
/// of a bundle-imported distilled run).
fn find_runs(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
    if dir.join(CONFIG_FILE).is_file() {
        out.push(dir.to_path_buf());
        return;
    }
    if depth == 0 {
        return;
    }
    let Ok(entries) = fs::read_dir(dir) else { return };
    let mut subs: Vec<PathBuf> = entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect();
    subs.sort();
    for s in subs {
        if !s.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')) {
            find_runs(&s, depth - 1, out);
        }
    }
}

/// The summary of one run folder (an unreadable one is reported with its error).
pub fn describe(dir: &Path) -> Value {
    let run = match Run::open(dir) {
        Ok(r) => r,
        Err(e) => return json!({"dir": dir, "kind": "unknown", "status": "unreadable", "error": format!("{e:#}")}),
    };
    let c = &run.config;
    let imported = c.source.get("type").and_then(Value::as_str) == Some("import")
        || c.source.get("type").and_then(Value::as_str) == Some("bundle");
    let kind = if c.kind == "biflow" { "distilled" } else if imported || c.train.is_null() { "imported" } else { "forward" };
    let total = c.train.get("steps").and_then(Value::as_u64);
    let status_file: Option<Value> = fs::read_to_string(dir.join(STATUS_FILE)).ok().and_then(|t| serde_json::from_str(&t).ok());
    let checkpoints = run.checkpoints().unwrap_or_default();
    let last_ck = checkpoints.last();
    // Steps: from metrics.jsonl's last line (what was trained), else the newest checkpoint.
    let (mut steps, mut best_bpd, mut last_loss) = (None::<u64>, None::<f64>, None::<f64>);
    if let Ok(text) = fs::read_to_string(run.metrics_path()) {
        for line in text.lines() {
            if let Ok(v) = serde_json::from_str::<Value>(line) {
                if let Some(s) = v.get("step").and_then(Value::as_u64) {
                    steps = Some(s);
                }
                if let Some(b) = v.get("bpd").and_then(Value::as_f64).filter(|b| b.is_finite()) {
                    best_bpd = Some(best_bpd.map_or(b, |x: f64| x.min(b)));
                }
                last_loss = v.get("loss").and_then(Value::as_f64).or(last_loss);
            }
        }
    }
    let steps = steps.or(last_ck.map(|c| c.step)).unwrap_or(0);
    let holder = lock_holder(dir);
    let state = status_file.as_ref().and_then(|v| v.get("state")).and_then(Value::as_str).map(str::to_string);
    let status = match (&holder, state.as_deref()) {
        (Some((_, _, true)), _) => "running".to_string(),
        // A writer that died without a word (killed): its last checkpoint is where it resumes.
        (Some((_, _, false)), _) | (None, Some("running")) => "interrupted".to_string(),
        (None, Some(s)) => s.to_string(),
        (None, None) if kind == "imported" => "complete".to_string(),
        (None, None) => match (total, last_ck) {
            (Some(t), Some(ck)) if ck.step >= t => "complete".to_string(),
            (_, Some(_)) => "interrupted".to_string(),
            _ if run.weights_path().is_file() => "complete".to_string(),
            _ => "failed".to_string(),
        },
    };
    let can_resume = kind != "imported"
        && status != "running"
        && last_ck.is_some()
        && !c.train.is_null()
        && total.is_some_and(|t| last_ck.is_some_and(|ck| ck.step < t));
    json!({
        "dir": dir,
        "kind": kind,
        "status": status,
        "steps": steps,
        "totalSteps": total,
        "bestBpd": best_bpd,
        "loss": last_loss,
        "lastCheckpoint": last_ck.map(|c| &c.dir),
        "canResume": can_resume,
        "lockedBy": holder.as_ref().filter(|h| h.2).map(|(pid, host, _)| json!({"pid": pid, "host": host})),
        "error": status_file.as_ref().and_then(|v| v.get("error")).filter(|e| !e.is_null()),
        "forward": c.forward.as_ref().map(|f| &f.dir),
        // "latents" for a run on VAE latents (its bits/dim are per latent value, not pixel bits/dim).
        "space": crate::models::flow::Values::of(c.latent.is_some()),
        "model": if c.kind == "biflow" { json!(c.reverse) } else { json!(c.model) },
    })
}

pub fn runs(o: RunsOptions) -> Result<Value> {
    let dir = PathBuf::from(&o.dir);
    ensure!(dir.is_dir(), "{} is not a folder", dir.display());
    let mut found = Vec::new();
    find_runs(&dir, o.depth, &mut found);
    Ok(json!({"dir": dir, "runs": found.iter().map(|d| describe(d)).collect::<Vec<_>>()}))
}
