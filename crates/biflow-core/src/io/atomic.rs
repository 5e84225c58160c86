//! Files a user could lose are written whole or not at all: temp file in the same folder, fsync, rename.

use std::cell::Cell;
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use anyhow::{ensure, Context, Result};

/// The fault switch: with `BIFLOW_FAULT_WRITE_AFTER_BYTES=N` in the environment, writes through [`Output`]
/// fail as a full disk does once this process has written N bytes through them. For tests of what a failing
/// disk leaves behind; never set in normal use.
pub const FAULT_ENV: &str = "BIFLOW_FAULT_WRITE_AFTER_BYTES";

static WRITTEN: AtomicU64 = AtomicU64::new(0);

fn env_limit() -> Option<u64> {
    static LIMIT: OnceLock<Option<u64>> = OnceLock::new();
    *LIMIT.get_or_init(|| std::env::var(FAULT_ENV).ok().and_then(|v| v.trim().parse().ok()))
}

thread_local! {
    /// The same switch for the current thread only (tests in one process): bytes left before writes fail.
    static THREAD_LEFT: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Make writes through [`Output`] on this thread fail after `bytes` more bytes (`None`: never). For tests.
#[doc(hidden)]
pub fn fail_writes_after(bytes: Option<u64>) {
    THREAD_LEFT.with(|l| l.set(bytes));
}

fn disk_full() -> std::io::Error {
    std::io::Error::other(format!("no space left on device (a fault injected by {FAULT_ENV} or a test)"))
}

/// How many of `want` bytes may be written now, or the injected error when none may.
fn allowance(want: usize) -> std::io::Result<usize> {
    if let Some(left) = THREAD_LEFT.with(|l| l.get()) {
        let n = (want as u64).min(left);
        if n == 0 && want > 0 {
            return Err(disk_full());
        }
        THREAD_LEFT.with(|l| l.set(Some(left - n)));
        return Ok(n as usize);
    }
    match env_limit() {
        None => Ok(want),
        Some(limit) => {
            let before = WRITTEN.fetch_add(want as u64, Ordering::SeqCst);
            let n = limit.saturating_sub(before).min(want as u64);
            if n < want as u64 {
                WRITTEN.fetch_sub(want as u64 - n, Ordering::SeqCst);
            }
            if n == 0 && want > 0 {
                return Err(disk_full());
            }
            Ok(n as usize)
        }
    }
}

/// A file being written: a [`fs::File`] whose writes pass the fault switch.
pub struct Output {
    file: fs::File,
    path: PathBuf,
}

impl Output {
    pub fn create(path: &Path) -> Result<Output> {
        let file = fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Output { file, path: path.to_path_buf() })
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Flush to the disk (`fsync`).
    pub fn sync_all(&self) -> Result<()> {
        self.file.sync_all().with_context(|| format!("cannot flush {} to disk", self.path.display()))
    }
}

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = allowance(buf.len())?;
        self.file.write(&buf[..n])
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl Seek for Output {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        self.file.seek(pos)
    }
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Write `path` atomically with whatever `write` puts into the file: a temp file in the same folder, fsync,
/// rename. On any failure (a full disk, a lost permission) `path` keeps its previous content, the temp file
/// is removed, and the error names `path` and the cause.
pub fn write_with(path: &Path, write: impl FnOnce(&mut Output) -> Result<()>) -> Result<()> {
    let tmp = temp_path(path);
    let result = (|| -> Result<()> {
        let mut f = Output::create(&tmp)?;
        write(&mut f)?;
        f.flush()?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
        // Make the rename itself durable.
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(d) = fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write {} (the previous file, if any, is unchanged)", path.display()))
}

/// Encode `img` as PNG and write it to `path` atomically.
pub fn write_png(path: &Path, img: &image::DynamicImage) -> Result<()> {
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png).context("cannot encode the PNG")?;
    write(path, &bytes)
}

/// Write `bytes` to `path` atomically.
pub fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    write_with(path, |f| Ok(f.write_all(bytes)?))
}

/// Refuse to write into a folder that already holds files, unless `force`.
pub(crate) fn ensure_empty_out(out: &Path, force: bool) -> Result<()> {
    if let Ok(mut entries) = std::fs::read_dir(out) {
        ensure!(
            force || entries.next().is_none(),
            "{} exists and is not empty: choose another --out, or add --force to write into it",
            out.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    #[test]
    fn replaces_whole_file_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.bin");
        super::write(&p, b"one").unwrap();
        super::write(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    /// A disk that fills part way through a write: at every cut, the old file survives whole, the error names
    /// the file and the cause, and no temp file is left.
    #[test]
    fn a_full_disk_keeps_the_previous_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("weights.safetensors");
        super::write(&p, b"previous").unwrap();
        let new = vec![7u8; 10_000];
        for cut in [0u64, 1, 4095, 9_999] {
            super::fail_writes_after(Some(cut));
            let err = format!("{:#}", super::write(&p, &new).unwrap_err());
            super::fail_writes_after(None);
            assert!(err.contains("weights.safetensors") && err.contains("no space left"), "{err}");
            assert_eq!(std::fs::read(&p).unwrap(), b"previous");
            assert_eq!(names(dir.path()), ["weights.safetensors"]);
        }
        // Enough room: written.
        super::fail_writes_after(Some(10_000));
        super::write(&p, &new).unwrap();
        super::fail_writes_after(None);
        assert_eq!(std::fs::read(&p).unwrap(), new);
    }

    /// The same on a real full disk: BIFLOW_SMALL_FS names a folder on a small filesystem (e.g. a 64 KiB
    /// tmpfs: `mount -t tmpfs -o size=64k tmpfs DIR`); skipped when unset.
    #[test]
    fn a_real_full_disk_keeps_the_previous_file() {
        let Some(root) = std::env::var_os("BIFLOW_SMALL_FS") else {
            eprintln!("skipped: set BIFLOW_SMALL_FS to a folder on a small filesystem");
            return;
        };
        let dir = tempfile::tempdir_in(root).unwrap();
        let p = dir.path().join("stats.npz");
        super::write(&p, b"previous").unwrap();
        let err = format!("{:#}", super::write(&p, &vec![1u8; 16 << 20]).unwrap_err());
        assert!(err.contains("stats.npz") && err.contains("No space left"), "{err}");
        assert_eq!(std::fs::read(&p).unwrap(), b"previous");
        assert_eq!(names(dir.path()), ["stats.npz"]);
    }

    /// A folder that cannot be written (permission lost): the error says which path and why.
    #[test]
    fn an_unwritable_folder_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("missing").join("a.bin");
        let err = format!("{:#}", super::write(&p, b"x").unwrap_err());
        assert!(err.contains("a.bin") && err.contains("No such file"), "{err}");
    }
}
