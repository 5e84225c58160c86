//! `biflow import tarflow CKPT.pth --out RUN`: turn a reference TARFlow `state_dict` into a biflow run.
//!
//! The configuration is inferred from the tensor shapes: blocks, layers per block, channels, token
//! count T and size D, classes. T = (img/p)^2 and D = C*p*p leave one unknown, settled by
//! `--in-channels` or `--img-size` (default: 3 channels, when the shapes allow it).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::models::flow::{FlowConfig, TarFlow, HEAD_DIM};
use crate::job::JobCtx;

/// Read a reference state_dict (.pth; only tensor rebuilds are accepted in the pickle) as named f32
/// tensors on the CPU, with
/// `module.` / `_orig_mod.` prefixes (DDP, torch.compile) removed.
pub fn read_reference_state(path: &Path) -> Result<Vec<(String, Tensor)>> {
    ensure!(path.exists(), "checkpoint {} does not exist", path.display());
    let entries = crate::io::pickle::read_state_dict(path)
        .with_context(|| format!("cannot read {} as a PyTorch state_dict", path.display()))?;
    let mut out = Vec::with_capacity(entries.len());
    for (name, t) in entries {
        let mut name = name.as_str();
        for prefix in ["module.", "_orig_mod."] {
            if let Some(rest) = name.strip_prefix(prefix) {
                name = rest;
            }
        }
        let tensor = Tensor::from_vec(t.data, t.shape, &Device::Cpu)
            .with_context(|| format!("tensor '{name}' has inconsistent shape and data"))?;
        out.push((name.to_string(), tensor));
    }
    Ok(out)
}

fn is_square(n: usize) -> Option<usize> {
    let r = (n as f64).sqrt().round() as usize;
    (r * r == n).then_some(r)
}

/// Infer the model configuration from the shapes of a reference state_dict.
pub fn infer_config(
    state: &HashMap<String, Tensor>,
    img_size: Option<usize>,
    in_channels: Option<usize>,
) -> Result<FlowConfig> {
    let dims = |name: &str| -> Result<Vec<usize>> {
        Ok(state
            .get(name)
            .with_context(|| format!("the checkpoint has no tensor '{name}': not a TARFlow state_dict"))?
            .dims()
            .to_vec())
    };
    let count = |prefix: &str| -> usize {
        let mut n = 0;
        while state.keys().any(|k| k.starts_with(&format!("{prefix}{n}."))) {
            n += 1;
        }
        n
    };
    let num_blocks = count("blocks.");
    ensure!(num_blocks > 0, "the checkpoint has no 'blocks.N.' tensors: not a TARFlow state_dict");
    let layers = count("blocks.0.attn_blocks.");
    ensure!(layers > 0, "the checkpoint has no 'blocks.0.attn_blocks.N.' tensors: not a TARFlow state_dict");
    let proj_in = dims("blocks.0.proj_in.weight")?;
    ensure!(proj_in.len() == 2, "blocks.0.proj_in.weight should be a matrix, got shape {proj_in:?}");
    let (channels, d) = (proj_in[0], proj_in[1]);
    let pos = dims("blocks.0.pos_embed")?;
    ensure!(pos.len() == 2 && pos[1] == channels, "blocks.0.pos_embed has shape {pos:?}, expected (T, {channels})");
    let t = pos[0];
    let proj_out = dims("blocks.0.proj_out.weight")?;
    ensure!(
        proj_out == [2 * d, channels],
        "blocks.0.proj_out.weight has shape {proj_out:?}; only affine (nvp=True) TARFlow models with shape [{}, {channels}] are supported",
        2 * d
    );
    ensure!(channels % HEAD_DIM == 0, "{channels} channels are not a multiple of the head size {HEAD_DIM}");
    let num_classes = match state.get("blocks.0.class_embed") {
        Some(ce) => {
            let s = ce.dims();
            ensure!(s.len() == 3 && s[1] == 1 && s[2] == channels, "blocks.0.class_embed has shape {s:?}, expected (K, 1, {channels})");
            s[0]
        }
        None => 0,
    };
    let grid = is_square(t).with_context(|| format!("{t} tokens do not form a square grid"))?;
    let (c, p) = match (img_size, in_channels) {
        (Some(img), given_c) => {
            ensure!(img % grid == 0, "--img-size {img} does not fit a grid of {grid}x{grid} patches");
            let p = img / grid;
            ensure!(d % (p * p) == 0, "--img-size {img} gives patch size {p}, which does not divide the token size {d}");
            let c = d / (p * p);
            if let Some(gc) = given_c {
                ensure!(gc == c, "--in-channels {gc} and --img-size {img} disagree with the token size {d} (would need {c} channels)");
            }
            (c, p)
        }
        (None, Some(c)) => {
            ensure!(c > 0 && d % c == 0, "--in-channels {c} does not divide the token size {d}");
            let p = is_square(d / c).with_context(|| format!("--in-channels {c} leaves {} values per channel in a token, not a square patch", d / c))?;
            (c, p)
        }
        (None, None) => {
            let guess = [3usize, 1, 4].into_iter().find_map(|c| (d % c == 0).then(|| is_square(d / c).map(|p| (c, p))).flatten());
            guess.with_context(|| format!("cannot tell the image channels from a token size of {d}: give --in-channels or --img-size"))?
        }
    };
    let cfg = FlowConfig {
        img_size: grid * p,
        in_channels: c,
        patch_size: p,
        channels,
        num_blocks,
        layers_per_block: layers,
        num_classes,
        clip_scale: None,
    };
    cfg.validate()?;
    Ok(cfg)
}

/// The tensors a TARFlow of this configuration reads (the reference names), plus `var`.
fn keep_tensor(name: &str) -> bool {
    !name.ends_with(".attn_mask")
}

crate::options! {
    pub struct ImportOptions {
        /// the reference TARFlow state_dict (.pth, PyTorch zip format)
        checkpoint: String,
        /// the run folder to create
        out: String,
        /// image size in pixels, when the shapes cannot tell it
        img_size: Option<usize>,
        /// image channels, when the shapes cannot tell them (default 3)
        in_channels: Option<usize>,
        /// replace an existing run folder
        force: bool,
    }
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The import job: read, infer, check by building the model, then write RUN atomically.
pub fn import_tarflow(o: ImportOptions, ctx: &JobCtx) -> Result<Value> {
    let ckpt = PathBuf::from(&o.checkpoint);
    let out = PathBuf::from(&o.out);
    if out.exists() && !o.force {
        bail!("{} already exists: choose another --out or pass --force to replace it", out.display());
    }
    ctx.message(format!("reading {}", ckpt.display()));
    let state = read_reference_state(&ckpt)?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, t) in state {
        if keep_tensor(&name) {
            tensors.insert(name, t.to_dtype(DType::F32)?);
        }
    }
    let cfg = infer_config(&tensors, o.img_size, o.in_channels)?;
    // Every tensor must belong to the model: check its parameter list, then look for leftovers.
    let expected = TarFlow::parameters(&cfg)?;
    for p in &expected {
        let got = tensors.get(&p.name).with_context(|| format!("the checkpoint lacks '{}' for the inferred configuration", p.name))?;
        ensure!(got.dims() == p.shape, "'{}' has shape {:?}, expected {:?}", p.name, got.dims(), p.shape);
    }
    for name in tensors.keys() {
        ensure!(name == "var" || expected.iter().any(|p| &p.name == name), "unexpected tensor '{name}' in the checkpoint: not a TARFlow state_dict this importer knows");
    }
    if let Some(v) = tensors.get("var") {
        ensure!(v.dims() == [cfg.num_tokens(), cfg.token_dim()], "'var' has shape {:?}, expected {:?}", v.dims(), [cfg.num_tokens(), cfg.token_dim()]);
    }
    TarFlow::new(VarBuilder::from_tensors(tensors.clone(), DType::F32, &Device::Cpu), &cfg)?;
    let params: usize = expected.iter().map(|p| p.shape.iter().product::<usize>()).sum();

    // Write into a sibling temp folder, then rename it into place.
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let name = out.file_name().context("--out must name a folder")?.to_string_lossy().into_owned();
    let tmp = parent.join(format!(".{name}.import-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let written = (|| -> Result<()> {
        std::fs::create_dir_all(&tmp)?;
        let sorted: BTreeMap<String, Tensor> = tensors.into_iter().collect();
        candle_core::safetensors::save(&sorted.into_iter().collect::<HashMap<_, _>>(), tmp.join("weights.safetensors"))
            .context("cannot write weights.safetensors")?;
        let config = json!({
            "version": 1,
            "kind": "tarflow",
            "model": cfg,
            "noiseStd": null,
            "dequantize": false,
            "train": null,
            "source": {
                "type": "import",
                "format": "tarflow-pth",
                "checkpoint": std::fs::canonicalize(&ckpt).unwrap_or(ckpt.clone()).display().to_string(),
                "sha256": sha256_file(&ckpt)?,
            },
        });
        crate::io::atomic::write(&tmp.join("config.json"), serde_json::to_string_pretty(&config)?.as_bytes())?;
        Ok(())
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.context(format!("cannot write the run {}", out.display())));
    }
    if out.exists() {
        std::fs::remove_dir_all(&out).with_context(|| format!("cannot replace {}", out.display()))?;
    }
    std::fs::rename(&tmp, &out).with_context(|| format!("cannot move the new run into {}", out.display()))?;
    ctx.message(format!("imported a {}-block TARFlow ({} parameters) into {}", cfg.num_blocks, params, out.display()));
    Ok(json!({ "run": out.display().to_string(), "model": cfg, "parameters": params }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tarflow-reference/tiny-cond.pth")
    }

    fn opts(ckpt: &Path, out: &Path) -> ImportOptions {
        ImportOptions { checkpoint: ckpt.display().to_string(), out: out.display().to_string(), img_size: None, in_channels: None, force: false }
    }

    #[test]
    fn infers_the_configuration_from_shapes() {
        let state: HashMap<String, Tensor> = read_reference_state(&fixture()).unwrap().into_iter().collect();
        let cfg = infer_config(&state, None, None).unwrap();
        assert_eq!(
            cfg,
            FlowConfig { img_size: 8, in_channels: 3, patch_size: 2, channels: 128, num_blocks: 4, layers_per_block: 1, num_classes: 3, clip_scale: None }
        );
        // D = 12 could also be 12 channels with patch 1: the flags settle it, and contradictions are errors.
        let c12 = infer_config(&state, None, Some(12)).unwrap();
        assert_eq!((c12.in_channels, c12.patch_size, c12.img_size), (12, 1, 4));
        assert_eq!(infer_config(&state, Some(4), None).unwrap().in_channels, 12);
        let e = infer_config(&state, Some(8), Some(12)).unwrap_err().to_string();
        assert!(e.contains("disagree"), "{e}");
        assert!(infer_config(&state, None, Some(5)).is_err());
    }

    #[test]
    fn a_pickle_naming_another_global_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let evil = dir.path().join("evil.pth");
        // {'x': os.system('echo pwned')} in a zip-format checkpoint.
        let mut p = vec![0x80, 2, b'}', b'('];
        p.extend(b"X\x01\x00\x00\x00x");
        p.extend(b"cos\nsystem\n");
        p.extend(b"X\x0a\x00\x00\x00echo pwned\x85R");
        p.extend(b"u.");
        {
            let f = std::fs::File::create(&evil).unwrap();
            let mut z = zip::ZipWriter::new(f);
            let o = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
            z.start_file("evil/data.pkl", o).unwrap();
            std::io::Write::write_all(&mut z, &p).unwrap();
            z.finish().unwrap();
        }
        let out = dir.path().join("run");
        let msg = format!("{:#}", import_tarflow(opts(&evil, &out), &JobCtx::silent()).unwrap_err());
        assert!(msg.contains("os.system"), "{msg}");
        assert!(!out.exists(), "a refused import must not leave a run behind");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporaries left");
    }

    #[test]
    fn a_truncated_checkpoint_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = std::fs::read(fixture()).unwrap();
        let cut = dir.path().join("cut.pth");
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        let msg = format!("{:#}", import_tarflow(opts(&cut, &dir.path().join("run")), &JobCtx::silent()).unwrap_err());
        assert!(msg.contains("cut.pth"), "{msg}");
        assert!(!dir.path().join("run").exists());
        let missing = import_tarflow(opts(&dir.path().join("nope.pth"), &dir.path().join("run")), &JobCtx::silent()).unwrap_err();
        assert!(missing.to_string().contains("does not exist"), "{missing}");
    }

    #[test]
    fn imports_a_run_that_loads_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run");
        let r = import_tarflow(opts(&fixture(), &out), &JobCtx::silent()).unwrap();
        assert_eq!(r["parameters"].as_u64().unwrap(), 821_856);
        let run = crate::run::Run::open(&out).unwrap();
        assert_eq!(run.config.noise_std, None);
        let model = run.load_flow(&Device::Cpu).unwrap();
        assert_eq!(model.config().num_classes, 3);
        let e = import_tarflow(opts(&fixture(), &out), &JobCtx::silent()).unwrap_err().to_string();
        assert!(e.contains("--force"), "{e}");
        let mut o = opts(&fixture(), &out);
        o.force = true;
        import_tarflow(o, &JobCtx::silent()).unwrap();
    }
}
