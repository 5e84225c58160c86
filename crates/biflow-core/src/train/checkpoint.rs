//! Checkpoints: parameters with their AdamW moments and EMA, the data position and the RNG, written
//! atomically and verified by checksum when read back.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::data::DataPos;
use crate::io::sha256_hex;
use crate::train::optim::{AdamW, Moments};
use crate::run::{decode_safetensors, encode_safetensors, Checkpoint, HostTensor, Run};


/// One trainable parameter with its host-side value, moments and EMA.
pub struct Slot {
    pub name: String,
    pub shape: Vec<usize>,
    /// The model's view of the parameter (autograd objectives read it).
    pub var: Var,
    pub value: Vec<f32>,
    pub mom: Moments,
    pub ema: Vec<f32>,
    /// Weight decay applies (weight matrices only).
    pub decay: bool,
}

/// The slots of every variable in `map`, in name order (the order gradients come in).
pub fn slots_of(map: &candle_nn::VarMap) -> Result<Vec<Slot>> {
    let vars: HashMap<String, Var> = map.data().lock().unwrap().clone();
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    let mut slots = Vec::new();
    for name in names {
        let var = vars[name].clone();
        let shape = var.dims().to_vec();
        let value = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        let n = value.len();
        slots.push(Slot {
            name: name.clone(),
            decay: shape.len() >= 2 && name.ends_with("weight"),
            shape,
            var,
            ema: value.clone(),
            value,
            mom: Moments::zeros(n),
        });
    }
    Ok(slots)
}

/// RNG position, exactly restorable.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RngState {
    pub seed: u64,
    pub stream: u64,
    /// u128 as a decimal string.
    pub word_pos: String,
}

pub(super) fn rng_state(seed: u64, rng: &ChaCha8Rng) -> RngState {
    RngState { seed, stream: rng.get_stream(), word_pos: rng.get_word_pos().to_string() }
}

pub(super) fn rng_restore(s: &RngState) -> Result<ChaCha8Rng> {
    let mut rng = ChaCha8Rng::seed_from_u64(s.seed);
    rng.set_stream(s.stream);
    rng.set_word_pos(s.word_pos.parse::<u128>().map_err(|_| anyhow!("bad RNG position '{}'", s.word_pos))?);
    Ok(rng)
}

/// RUN/checkpoints/step-N/state.json.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointState {
    pub version: u32,
    pub step: u64,
    pub adam_steps: u64,
    pub data: DataPos,
    pub rng: RngState,
    /// The model's configuration and the job's resolved options (a job checks them on resume).
    pub model: serde_json::Value,
    pub train: serde_json::Value,
    /// sha256 of each file in the folder.
    pub files: std::collections::BTreeMap<String, String>,
    pub loss: Option<f64>,
    pub elapsed_secs: f64,
}

/// Write and fsync one file of a checkpoint (through the fault switch of io::atomic; errors name it).
fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = crate::io::atomic::Output::create(path)?;
    f.write_all(bytes).with_context(|| format!("cannot write {}", path.display()))?;
    f.sync_all()
}

/// Everything a checkpoint records, borrowed from the trainer.
pub(super) struct TrainState<'a> {
    pub run: &'a Run,
    pub options: &'a serde_json::Value,
    pub model: &'a serde_json::Value,
    pub keep: usize,
    pub slots: &'a [Slot],
    pub adam: &'a AdamW,
    pub data: DataPos,
    pub rng: RngState,
    pub loss: Option<f64>,
    pub elapsed: f64,
}

/// Write checkpoint `step` atomically (temp folder, then rename), update weights.safetensors (EMA),
/// and keep only the newest `keep` checkpoints.
pub(super) fn save_checkpoint(step: u64, st: &TrainState) -> Result<Checkpoint> {
    let run = st.run;
    let cdir = run.checkpoints_dir();
    fs::create_dir_all(&cdir)?;
    let tmp = cdir.join(format!(".step-{step:08}.tmp-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    // A failed write (disk full, permission lost) leaves the earlier checkpoints and no temp folder.
    let written = write_checkpoint_files(step, st, &tmp);
    let dest = run.checkpoint_dir(step);
    let installed = written.and_then(|ema_bytes| {
        install(&tmp, &dest)?;
        Ok(ema_bytes)
    });
    let ema_bytes = match installed {
        Ok(b) => b,
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e.context(format!("checkpoint {step} was not written; the earlier checkpoints are intact")));
        }
    };
    if let Ok(d) = fs::File::open(&cdir) {
        let _ = d.sync_all();
    }
    crate::io::atomic::write(&run.weights_path(), &ema_bytes)?;
    let all = run.checkpoints()?;
    if all.len() > st.keep {
        for old in &all[..all.len() - st.keep] {
            let _ = fs::remove_dir_all(&old.dir);
        }
    }
    Ok(Checkpoint { step, dir: dest })
}

/// Rename the finished `tmp` folder to `dest`; an existing `dest` is moved aside first and removed
/// only once the new one is in place.
fn install(tmp: &Path, dest: &Path) -> Result<()> {
    let aside = dest.with_extension("old");
    let replacing = dest.exists();
    if replacing {
        let _ = fs::remove_dir_all(&aside);
        fs::rename(dest, &aside).with_context(|| format!("cannot move {} aside to replace it", dest.display()))?;
    }
    if let Err(e) = fs::rename(tmp, dest) {
        if replacing {
            let _ = fs::rename(&aside, dest);
        }
        return Err(e).with_context(|| format!("cannot move the checkpoint into {}", dest.display()));
    }
    if replacing {
        let _ = fs::remove_dir_all(&aside);
    }
    Ok(())
}

/// The files of checkpoint `step` in `tmp`; returns the EMA weights' bytes (weights.safetensors).
fn write_checkpoint_files(step: u64, st: &TrainState, tmp: &Path) -> Result<Vec<u8>> {
    let host = |f: &dyn Fn(&Slot) -> Vec<f32>| -> Vec<(String, HostTensor)> {
        st.slots.iter().map(|s| (s.name.clone(), HostTensor { shape: s.shape.clone(), data: f(s) })).collect()
    };
    let model = host(&|s| s.value.clone());
    let ema = host(&|s| s.ema.clone());
    let mut optim_t = Vec::new();
    for s in st.slots {
        optim_t.push((format!("m.{}", s.name), HostTensor { shape: s.shape.clone(), data: s.mom.m.clone() }));
        optim_t.push((format!("v.{}", s.name), HostTensor { shape: s.shape.clone(), data: s.mom.v.clone() }));
    }
    let mut files = std::collections::BTreeMap::new();
    let ema_bytes = encode_safetensors(&ema)?;
    for (name, bytes) in [
        ("model.safetensors", encode_safetensors(&model)?),
        ("ema.safetensors", ema_bytes.clone()),
        ("optimizer.safetensors", encode_safetensors(&optim_t)?),
    ] {
        files.insert(name.to_string(), sha256_hex(&bytes));
        write_synced(&tmp.join(name), &bytes)?;
    }
    let state = CheckpointState {
        version: 1,
        step,
        adam_steps: st.adam.t,
        data: st.data,
        rng: st.rng.clone(),
        model: st.model.clone(),
        train: st.options.clone(),
        files,
        loss: st.loss,
        elapsed_secs: st.elapsed,
    };
    write_synced(&tmp.join("state.json"), serde_json::to_string_pretty(&state)?.as_bytes())?;
    if let Ok(d) = fs::File::open(tmp) {
        let _ = d.sync_all();
    }
    Ok(ema_bytes)
}

/// A checkpoint read back and verified.
pub struct LoadedCheckpoint {
    pub state: CheckpointState,
    pub model: Vec<(String, HostTensor)>,
    pub ema: Vec<(String, HostTensor)>,
    pub optimizer: Vec<(String, HostTensor)>,
}

/// Read and verify a checkpoint: every file present, its checksum as recorded, parseable.
pub fn load_checkpoint(c: &Checkpoint) -> Result<LoadedCheckpoint> {
    let d = c.dir.display();
    let text = fs::read_to_string(c.state_path()).with_context(|| format!("checkpoint {d} is incomplete: cannot read state.json"))?;
    let state: CheckpointState =
        serde_json::from_str(&text).with_context(|| format!("checkpoint {d} is corrupted: state.json is not a valid checkpoint state"))?;
    let read = |name: &str| -> Result<Vec<(String, HostTensor)>> {
        let path = c.dir.join(name);
        let bytes = fs::read(&path).with_context(|| format!("checkpoint {d} is incomplete: cannot read {name}"))?;
        let want = state.files.get(name).ok_or_else(|| anyhow!("checkpoint {d} is corrupted: state.json records no checksum for {name}"))?;
        if &sha256_hex(&bytes) != want {
            bail!("checkpoint {d} is corrupted or truncated: {name} does not match the checksum in state.json (delete this checkpoint folder to resume from an earlier one)");
        }
        decode_safetensors(&bytes).with_context(|| format!("checkpoint {d} is corrupted: {name} is not a readable safetensors file"))
    };
    let model = read("model.safetensors")?;
    let ema = read("ema.safetensors")?;
    let optimizer = read("optimizer.safetensors")?;
    Ok(LoadedCheckpoint { state, model, ema, optimizer })
}

pub(super) fn restore_slots(slots: &mut [Slot], ck: &LoadedCheckpoint, device: &Device) -> Result<()> {
    let index = |v: &Vec<(String, HostTensor)>| v.iter().map(|(n, t)| (n.clone(), t.clone())).collect::<HashMap<_, _>>();
    let (mut model, mut ema, mut opt) = (index(&ck.model), index(&ck.ema), index(&ck.optimizer));
    if model.len() != slots.len() {
        bail!("the checkpoint holds {} tensors but the model has {} parameters", model.len(), slots.len());
    }
    for s in slots.iter_mut() {
        let take = |map: &mut HashMap<String, HostTensor>, key: &str, what: &str| -> Result<Vec<f32>> {
            let t = map.remove(key).ok_or_else(|| anyhow!("the checkpoint's {what} lacks {key}"))?;
            if t.shape != s.shape {
                bail!("the checkpoint's {what} has {key} with shape {:?}, the model wants {:?}", t.shape, s.shape);
            }
            Ok(t.data)
        };
        s.value = take(&mut model, &s.name, "model")?;
        s.ema = take(&mut ema, &s.name, "EMA")?;
        s.mom.m = take(&mut opt, &format!("m.{}", s.name), "optimizer state")?;
        s.mom.v = take(&mut opt, &format!("v.{}", s.name), "optimizer state")?;
    }
    upload_slots(slots, device)
}

/// Copy every slot's host value into its variable on `device`. Off the CPU (and on the composed path,
/// which tests it there) all values travel in one host-to-device copy: a GPU pays a synchronisation per
/// transfer, and a model has hundreds of tensors.
pub(crate) fn upload_slots(slots: &[Slot], device: &Device) -> Result<()> {
    if crate::device::mode::Backend::of(device) == crate::device::mode::Backend::Fused {
        for s in slots {
            s.var.set(&Tensor::from_slice(&s.value, s.shape.as_slice(), device)?)?;
        }
        return Ok(());
    }
    let all: Vec<f32> = slots.iter().flat_map(|s| s.value.iter().copied()).collect();
    let n = all.len();
    let all = Tensor::from_vec(all, n, device)?;
    let mut offset = 0;
    for s in slots {
        s.var.set(&all.narrow(0, offset, s.value.len())?.reshape(s.shape.as_slice())?)?;
        offset += s.value.len();
    }
    Ok(())
}
