//! One writer per run: `train` and `distill` hold RUN/lock.json (pid, host, start time) while they
//! write into RUN; readers (sample, eval, report) never take it. A lock left by a process that no
//! longer exists on this host is taken over with a message; a live one is a clear error naming its pid.
//!
//! RUN/status.json records how the last writer ended (running, complete, interrupted, failed), which
//! `biflow runs` reports.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::job::JobCtx;

pub const LOCK_FILE: &str = "lock.json";
pub const STATUS_FILE: &str = "status.json";

/// The lock on a run folder; released (the file removed) when dropped.
#[derive(Debug)]
pub struct RunLock {
    path: PathBuf,
    /// The folder did not exist before: removed again on release if nothing else was written into it
    /// (a job that fails its checks leaves no trace).
    created_dir: bool,
}

/// This machine's name (for the lock record).
pub fn host_name() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// Whether process `pid` exists on this machine (where that cannot be told, it is assumed alive).
pub fn pid_alive(pid: u64) -> bool {
    if Path::new("/proc/self").exists() {
        return Path::new(&format!("/proc/{pid}")).exists();
    }
    true
}

/// The holder of RUN's lock, if any: (pid, host, alive). `alive` is false for a lock of a process
/// that is gone from this host.
pub fn lock_holder(run_dir: &Path) -> Option<(u64, String, bool)> {
    let text = fs::read_to_string(run_dir.join(LOCK_FILE)).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    let pid = v.get("pid")?.as_u64()?;
    let host = v.get("host").and_then(Value::as_str).unwrap_or("unknown").to_string();
    let alive = host != host_name() || pid_alive(pid);
    Some((pid, host, alive))
}

impl RunLock {
    /// Lock `run_dir` (created if missing) for writing by this process.
    pub fn acquire(run_dir: &Path, ctx: &JobCtx) -> Result<RunLock> {
        let created_dir = !run_dir.exists();
        fs::create_dir_all(run_dir).with_context(|| format!("cannot create the run folder {}", run_dir.display()))?;
        let path = run_dir.join(LOCK_FILE);
        let record = json!({
            "pid": std::process::id(),
            "host": host_name(),
            "started": unix_now(),
            "biflowVersion": env!("CARGO_PKG_VERSION"),
        });
        for _attempt in 0..3 {
            match fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    f.write_all(format!("{record}\n").as_bytes()).with_context(|| format!("cannot write {}", path.display()))?;
                    return Ok(RunLock { path, created_dir });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => match lock_holder(run_dir) {
                    Some((pid, host, true)) => bail!(
                        "{} is being written by another process (pid {pid} on {host}); wait for it to finish or stop it \
                         (if that process is gone, delete {})",
                        run_dir.display(),
                        path.display()
                    ),
                    Some((pid, host, false)) => {
                        ctx.message(format!("taking over the stale lock of {} (pid {pid} on {host} no longer runs)", run_dir.display()));
                        let _ = fs::remove_file(&path);
                    }
                    // Unreadable: a writer that died while writing it (it is written in one go).
                    None => {
                        ctx.message(format!("replacing the unreadable lock file {}", path.display()));
                        let _ = fs::remove_file(&path);
                    }
                },
                Err(e) => return Err(e).with_context(|| format!("cannot create the lock {}", path.display())),
            }
        }
        bail!("cannot take the lock {}: it keeps reappearing", path.display())
    }

    /// The run folder this lock holds.
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
        if self.created_dir {
            // Fails (and keeps the folder) unless it is empty.
            let _ = fs::remove_dir(self.dir());
        }
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Record how the writer stands: "running", "complete", "interrupted" or "failed" (with the error).
pub fn write_status(run_dir: &Path, state: &str, step: u64, total: u64, error: Option<&str>) -> Result<()> {
    let v = json!({"state": state, "step": step, "steps": total, "error": error, "time": unix_now()});
    crate::io::atomic::write(&run_dir.join(STATUS_FILE), format!("{v}\n").as_bytes())
}

pub const HISTORY_FILE: &str = "history.jsonl";

/// Append a line to RUN/history.jsonl: who wrote into the run, when, with which command line.
pub fn record_history(run_dir: &Path, command: Option<&str>, from_step: u64) -> Result<()> {
    use std::io::Write;
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let line = json!({"time": t, "command": command, "fromStep": from_step, "biflowVersion": env!("CARGO_PKG_VERSION"), "host": host_name()});
    let mut f = fs::OpenOptions::new().create(true).append(true).open(run_dir.join(HISTORY_FILE))?;
    writeln!(f, "{line}")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_writer_is_refused_and_stale_locks_are_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let ctx = JobCtx::silent();
        let lock = RunLock::acquire(&run, &ctx).unwrap();
        let e = RunLock::acquire(&run, &ctx).unwrap_err().to_string();
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        drop(lock);
        assert!(!run.exists(), "a folder the lock created and nothing else used is removed again");
        fs::create_dir_all(&run).unwrap();
        // A lock of a process that is gone (pid beyond the kernel's maximum) is taken over.
        fs::write(run.join(LOCK_FILE), format!("{{\"pid\": 4294967295, \"host\": \"{}\"}}", host_name())).unwrap();
        let messages = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let m2 = messages.clone();
        let ctx = JobCtx::new(
            move |e| {
                if let crate::job::Event::Message { text } = e {
                    m2.lock().unwrap().push(text)
                }
            },
            Default::default(),
        );
        let _lock = RunLock::acquire(&run, &ctx).unwrap();
        assert!(messages.lock().unwrap().iter().any(|m| m.contains("stale lock")));
    }
}
