//! Shareable model bundles: what sampling needs, plus a model card and a preview.
//!
//! ```text
//! bundle.json              {"format":"biflow-bundle","version":1,"kind":..,"files":{path: sha256}}
//! README.md                the model card: provenance, configuration, metrics, how to use it
//! config.json              the run's config (a distilled run's forward.dir is "forward")
//! weights.safetensors      the EMA weights
//! preview.png              16 samples
//! forward/config.json, forward/weights.safetensors    a distilled run's forward flow F
//! vae/config.json, vae/diffusion_pytorch_model.safetensors  a latent run's VAE (--include-vae)
//! ```
//!
//! A latent run's bundle without its VAE names it by checksum (config.json's `latent`); importing
//! it then needs the VAE's folder (`--vae`), checked against that checksum.
//!
//! The archive itself (tar.gz) is written and read by the CLI with npm `tar`; the core stages the
//! files (`export`) and checks an unpacked bundle before it becomes a run (`import-bundle`).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::Device;
use serde_json::{json, Value};

use crate::job::JobCtx;
use crate::run::{Run, CONFIG_FILE, WEIGHTS_FILE};

pub const MANIFEST: &str = "bundle.json";
/// Every file a bundle may hold (besides bundle.json); anything else is refused.
pub const ALLOWED: &[&str] = &[
    "README.md",
    CONFIG_FILE,
    WEIGHTS_FILE,
    "preview.png",
    "forward/config.json",
    "forward/weights.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.bin",
];

/// Where a bundle carries a latent run's VAE, relative to the run (and to its forward/).
const BUNDLED_VAE: &str = "vae";

crate::options! {
    pub struct ExportOptions {
        /// the run folder to export (forward, distilled or imported)
        run: String,
        /// the bundle file to write (.tar.gz)
        out: String,
        /// include preview.png (16 samples)
        preview: bool = true,
        /// replace an existing --out file
        force: bool,
        /// a latent run: carry its VAE in the bundle (else the bundle names it by checksum and `import bundle` asks for it)
        include_vae: bool,
    }
}

/// Images in a bundle's preview grid.
const PREVIEW: usize = 16;

/// A new empty folder beside `near` (the same file system, so that what is staged there can be
/// renamed into place).
fn staging_near(near: &Path, tag: &str) -> Result<PathBuf> {
    let near = std::path::absolute(near)?;
    let parent = near.parent().filter(|p| p.is_dir()).map(Path::to_path_buf).unwrap_or_else(std::env::temp_dir);
    let name = near.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    for attempt in 0..100u32 {
        let dir = parent.join(format!(".{name}.{tag}-{}-{attempt}", std::process::id()));
        match fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot create a staging folder in {}", parent.display())),
        }
    }
    bail!("cannot create a staging folder in {}", parent.display())
}

fn copy_checked(from: &Path, to: &Path) -> Result<()> {
    if let Some(p) = to.parent() {
        fs::create_dir_all(p)?;
    }
    fs::copy(from, to).with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    Ok(())
}

fn with_source(config: &crate::run::RunConfig, run: &Path) -> Result<Value> {
    let mut v = serde_json::to_value(config)?;
    let original = v.get("source").cloned().unwrap_or(Value::Null);
    v["source"] = json!({"type": "bundle", "exportedFrom": fs::canonicalize(run).unwrap_or(run.to_path_buf()), "original": original});
    Ok(v)
}

/// Stage the files of RUN's bundle in a new folder beside `out`, for the CLI to pack there; returns
/// the folder and its file list (bundle.json last). Nothing is left behind when it fails.
pub fn stage(o: ExportOptions, ctx: &JobCtx) -> Result<Value> {
    let out = Path::new(&o.out);
    ensure!(o.force || !out.exists(), "{} exists; choose another --out or add --force to replace it", out.display());
    let run = Run::open(Path::new(&o.run))?;
    let staging = staging_near(out, "export")?;
    stage_into(&run, &staging, &o, ctx).inspect_err(|_| {
        let _ = fs::remove_dir_all(&staging);
    })
}

fn stage_into(run: &Run, staging: &Path, o: &ExportOptions, ctx: &JobCtx) -> Result<Value> {
    ctx.start("stage", None);
    let mut files: Vec<String> = Vec::new();

    // The model: config and EMA weights (a distilled run also carries its verified forward run).
    let mut config = with_source(&run.config, &run.dir)?;
    ensure!(!o.include_vae || run.config.latent.is_some(), "--include-vae: {} is a run on pixels, it has no VAE", run.dir.display());
    if o.include_vae {
        // The VAE the run records (checked by checksum), under vae/; the configs point there.
        let dir = run.vae_dir(None, "put it back to include it, or export without --include-vae")?.expect("a latent run");
        let weights = crate::models::vae::Vae::weights_file(&dir)?;
        let name = format!("{BUNDLED_VAE}/{}", weights.file_name().expect("a file").to_string_lossy());
        copy_checked(&dir.join("config.json"), &staging.join(BUNDLED_VAE).join("config.json"))?;
        copy_checked(&weights, &staging.join(&name))?;
        files.extend([format!("{BUNDLED_VAE}/config.json"), name]);
        config["latent"]["vae"] = json!(BUNDLED_VAE);
    }
    if run.is_distilled() {
        let f = run.forward_run()?;
        config["forward"]["dir"] = json!("forward");
        let mut fcfg = with_source(&f.config, &f.dir)?;
        if o.include_vae && fcfg.get("latent").is_some() {
            fcfg["latent"]["vae"] = json!(format!("../{BUNDLED_VAE}"));
        }
        crate::io::atomic::write(&staging.join("forward/config.json").tap_parent()?, format!("{}\n", serde_json::to_string_pretty(&fcfg)?).as_bytes())?;
        copy_checked(&f.sampling_weights_path()?, &staging.join("forward/weights.safetensors"))?;
        files.extend(["forward/config.json".to_string(), "forward/weights.safetensors".to_string()]);
    }
    crate::io::atomic::write(&staging.join(CONFIG_FILE), format!("{}\n", serde_json::to_string_pretty(&config)?).as_bytes())?;
    copy_checked(&run.sampling_weights_path()?, &staging.join(WEIGHTS_FILE))?;
    files.extend([CONFIG_FILE.to_string(), WEIGHTS_FILE.to_string()]);

    // A preview grid: the run's default sampler (G for a distilled run, causal decoding otherwise).
    if o.preview {
        ctx.message(format!("sampling a preview of {PREVIEW} images"));
        let mut s = crate::jobs::sample::Sampler::new(&crate::jobs::sample::SampleOptions::streaming(&o.run, None, PREVIEW, 0, 0.0), &candle_core::Device::Cpu)?;
        let (c, h, w) = s.output_shape();
        if let Some(x) = s.next_batch(PREVIEW, |_| ctx.check_cancelled())? {
            let v = x.flatten_all()?.to_vec1::<f32>()?;
            if let Ok(img) = crate::io::image::grid(&v, PREVIEW, c, h, w) {
                crate::io::atomic::write_png(&staging.join("preview.png"), &img)?;
                files.push("preview.png".into());
            }
        }
    }

    // The model card.
    let summary = crate::jobs::runs::describe(&run.dir);
    let card = model_card(&run, &summary);
    crate::io::atomic::write(&staging.join("README.md"), card.as_bytes())?;
    files.push("README.md".into());

    let mut sums = BTreeMap::new();
    for f in &files {
        sums.insert(f.clone(), crate::io::sha256_hex(&fs::read(staging.join(f))?));
    }
    let manifest = json!({
        "format": "biflow-bundle",
        "version": 1,
        "kind": summary["kind"],
        "biflowVersion": env!("CARGO_PKG_VERSION"),
        "files": sums,
    });
    crate::io::atomic::write(&staging.join(MANIFEST), format!("{}\n", serde_json::to_string_pretty(&manifest)?).as_bytes())?;
    files.push(MANIFEST.into());
    ctx.end();
    Ok(json!({"staging": staging, "files": files, "kind": summary["kind"]}))
}

trait TapParent {
    fn tap_parent(self) -> Result<PathBuf>;
}
impl TapParent for &PathBuf {
    /// The path, after creating its parent folder.
    fn tap_parent(self) -> Result<PathBuf> {
        if let Some(p) = self.parent() {
            fs::create_dir_all(p)?;
        }
        Ok(self.clone())
    }
}

fn model_card(run: &Run, summary: &Value) -> String {
    let c = &run.config;
    let name = run.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    let kind = summary["kind"].as_str().unwrap_or("?");
    let mut s = format!("# {name}: a biflow {kind} model\n\n");
    s += &format!(
        "Bidirectional Normalizing Flow (BiFlow) bundle made by biflow {}. {}\n\n",
        env!("CARGO_PKG_VERSION"),
        if run.is_distilled() {
            "It holds the learned reverse model G (one network evaluation per sample) and the forward flow F it was distilled from (in forward/)."
        } else {
            "It holds a TARFlow forward flow F (exact sampling by causal decoding)."
        }
    );
    s += "## Use\n\n    biflow import bundle THIS.tar.gz --out runs/model\n";
    s += "    biflow sample --model runs/model --num 16 --out samples/\n\n";
    s += "## Provenance\n\n";
    let data = c.train.get("data").and_then(Value::as_str);
    if let Some(d) = data {
        s += &format!("- dataset: `{d}`");
        if let Some(sum) = dataset_checksum(Path::new(d)) {
            s += &format!(" (manifest checksum sha256 `{sum}`)");
        }
        s += "\n";
    }
    if let Some(f) = &c.forward {
        s += &format!("- forward run: `{}` (weights sha256 `{}`)\n", f.dir, f.weights_sha256);
    }
    if let Some(l) = &c.latent {
        s += &format!("- latent space of the VAE `{}` (weights sha256 `{}`, scaling {}, shift {}): samples are its decodings\n", l.vae, l.vae_sha256, l.scaling_factor, l.shift_factor);
    }
    s += &format!("- source: `{}`\n", c.source);
    s += &format!("- exported from: `{}`\n\n", fs::canonicalize(&run.dir).unwrap_or(run.dir.clone()).display());
    s += "## Metrics\n\n";
    s += &format!("- status: {}, steps: {}\n", summary["status"].as_str().unwrap_or("?"), summary["steps"]);
    if let Some(b) = summary["bestBpd"].as_f64() {
        s += &format!("- best training bits/dim: {b:.4}\n");
    }
    if let Some(l) = summary["loss"].as_f64() {
        s += &format!("- last training loss: {l:.5}\n");
    }
    if let Ok(t) = fs::read_to_string(run.dir.join("evaluation.json")) {
        s += &format!("- evaluation: `{}`\n", t.trim());
    }
    s += "\n## Configuration\n\n```json\n";
    s += &serde_json::to_string_pretty(&json!({"model": c.model, "reverse": c.reverse, "noiseStd": c.noise_std, "train": c.train})).unwrap_or_default();
    s += "\n```\n\nThe preview (preview.png) shows 16 samples with the run's default method and seed 0.\n";
    s
}

/// The checksum recorded in a prepared dataset's manifest (None when it cannot be read).
pub fn dataset_checksum(dir: &Path) -> Option<String> {
    let text = fs::read_to_string(dir.join("manifest.json")).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    v.get("checksum")?.get("value")?.as_str().map(str::to_string)
}

crate::options! {
    pub struct ImportBundleOptions {
        /// the bundle (.tar.gz from biflow export)
        bundle: String,
        /// the run folder to create
        out: String,
        /// replace an existing --out folder
        force: bool,
        /// the folder the CLI unpacked the bundle into, beside --out
        unpacked: String,
        /// a latent model's VAE folder, for a bundle that names its VAE without carrying it (checked by checksum)
        vae: Option<String>,
    }
}

/// Make an unpacked bundle the run `out`, once [`verify`] passes (an existing `out` is replaced
/// only with `force`).
pub fn install(o: ImportBundleOptions, ctx: &JobCtx) -> Result<Value> {
    let (out, unpacked) = (Path::new(&o.out), Path::new(&o.unpacked));
    crate::io::atomic::ensure_empty_out(out, o.force)?;
    ensure!(o.force || !out.is_file(), "{} is a file: choose another --out, or add --force to replace it", out.display());
    let v = verify(unpacked, o.vae.as_deref().map(Path::new), ctx)?;
    if out.is_dir() {
        fs::remove_dir_all(out).with_context(|| format!("cannot replace {}", out.display()))?;
    } else if out.exists() {
        fs::remove_file(out).with_context(|| format!("cannot replace {}", out.display()))?;
    }
    fs::rename(unpacked, out).with_context(|| format!("cannot move the unpacked bundle to {}", out.display()))?;
    Ok(json!({"run": o.out, "kind": v["kind"], "files": v["files"]}))
}

/// Check an unpacked bundle: exactly the files its manifest lists, each with its checksum, and a
/// run that opens and whose weights load.
fn verify(dir: &Path, vae: Option<&Path>, ctx: &JobCtx) -> Result<Value> {
    ctx.start("verify", None);
    let text = fs::read_to_string(dir.join(MANIFEST)).context("not a biflow bundle: it has no bundle.json")?;
    let m: Value = serde_json::from_str(&text).context("not a biflow bundle: bundle.json is not valid JSON")?;
    ensure!(m["format"] == "biflow-bundle" && m["version"] == 1, "not a biflow bundle (format {}, version {})", m["format"], m["version"]);
    let Some(files) = m["files"].as_object() else { bail!("bundle.json lists no files") };
    for (name, sum) in files {
        ensure!(ALLOWED.contains(&name.as_str()), "bundle.json lists an unexpected file '{name}'");
        let path = dir.join(name);
        let meta = fs::symlink_metadata(&path).with_context(|| format!("the bundle lacks {name}, which its manifest lists"))?;
        ensure!(meta.is_file(), "{name} in the bundle is not a plain file");
        let actual = crate::io::sha256_hex(&fs::read(&path)?);
        ensure!(Some(actual.as_str()) == sum.as_str(), "{name} in the bundle does not match its checksum (corrupted or altered)");
    }
    // Nothing beyond what the manifest lists.
    let mut present = Vec::new();
    list_files(&dir, &dir, &mut present)?;
    for p in present {
        ensure!(p == MANIFEST || files.contains_key(&p), "the bundle holds '{p}', which its manifest does not list");
    }
    let mut run = Run::open(&dir)?;
    let device = Device::Cpu;
    run.load_flow(&device).context("the bundle's forward weights do not load")?;
    if run.is_distilled() {
        run.load_reverse(&device).context("the bundle's reverse model does not load")?;
    }
    attach_vae(&mut run, files.keys().any(|f| f.starts_with(BUNDLED_VAE)), vae)?;
    ctx.end();
    Ok(json!({"kind": m["kind"], "files": files.len()}))
}

/// A latent model's VAE: the one the bundle carries, else `--vae` (or, on the machine it came from,
/// the recorded folder), checked by checksum and then recorded in the run's configs as absolute.
fn attach_vae(run: &mut Run, carried: bool, given: Option<&Path>) -> Result<()> {
    let Some(info) = run.config.latent.clone() else {
        ensure!(given.is_none(), "--vae: this bundle holds a model on pixels, which needs no VAE");
        return Ok(());
    };
    ensure!(!(carried && given.is_some()), "--vae: this bundle carries its own VAE");
    let fix = format!("this bundle holds a model on VAE latents and names its VAE by checksum (sha256 {}) without carrying it: give its folder with --vae DIR", info.vae_sha256);
    let at = if carried { Some(run.dir.join(BUNDLED_VAE)) } else { given.map(Path::to_path_buf) };
    match (&at, Path::new(&info.vae).is_absolute()) {
        (Some(_), _) | (None, true) => {}
        (None, false) => bail!("{fix}"),
    }
    run.load_vae(at.as_deref(), &fix, &Device::Cpu).context("the bundle's VAE")?;
    if let Some(dir) = given {
        // Record where the VAE is on this machine, for the run and its forward flow.
        let path = crate::data::latent::recorded_path(&dir.display().to_string());
        run.config.latent.as_mut().expect("latent").vae = path.clone();
        run.write_config()?;
        if run.is_distilled() {
            let mut f = Run::open(&run.dir.join("forward"))?;
            if let Some(l) = f.config.latent.as_mut() {
                l.vae = path;
                f.write_config()?;
            }
        }
    }
    Ok(())
}

fn list_files(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
    for e in fs::read_dir(dir)? {
        let e = e?;
        let t = e.file_type()?;
        let rel = e.path().strip_prefix(root)?.to_string_lossy().replace('\\', "/");
        if t.is_dir() {
            list_files(root, &e.path(), out)?;
        } else {
            ensure!(t.is_file(), "the bundle holds '{rel}', which is not a plain file");
            out.push(rel);
        }
    }
    Ok(())
}
