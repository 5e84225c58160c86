//! The fuzzed readers of files on disk: dataset preparation (tar, idx, npz), prepared datasets and run
//! folders.

use super::*;

// ---------------------------------------------------------------------------------------------------------
// Readers of files on disk: each input is a set of named files, framed in one byte string

/// Fuzz a reader of files: the mutated `set` is written to a fresh folder (named `step-00000001`, as a
/// checkpoint's must be) and `read` is given that folder.
fn fuzz_files(
    reader: &str,
    cases: u64,
    set: Vec<(String, Vec<u8>)>,
    mutate: impl Fn(&mut Rand, &mut Vec<(String, Vec<u8>)>),
    read: impl Fn(&Path) -> Result<()> + Sync,
) {
    let tmp = tempfile::tempdir().unwrap();
    let n = std::sync::atomic::AtomicU64::new(0);
    // Names and contents alternate in the frame, so that mutations may rename files too.
    let to_frame = |s: &[(String, Vec<u8>)]| {
        frame(
            &s.iter()
                .flat_map(|(n, d)| [n.as_bytes().to_vec(), d.clone()])
                .collect::<Vec<_>>(),
        )
    };
    fuzz(
        reader,
        cases,
        &[to_frame(&set)],
        |rng, _| {
            let mut s = set.clone();
            mutate(rng, &mut s);
            to_frame(&s)
        },
        |b| {
            let k = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir = tmp.path().join(format!("c{k}")).join("step-00000001");
            std::fs::create_dir_all(&dir)?;
            let parts = unframe(b);
            let r = (|| {
                for pair in parts.chunks_exact(2) {
                    let name = String::from_utf8_lossy(&pair[0]).into_owned();
                    // Only plain names: the harness must not write outside its folder.
                    if !name.is_empty()
                        && !name.contains(['/', '\\', '\0'])
                        && name != "."
                        && name != ".."
                    {
                        std::fs::write(dir.join(name), &pair[1])?;
                    }
                }
                read(&dir)
            })();
            let _ = std::fs::remove_dir_all(dir.parent().unwrap());
            r
        },
    );
}

fn gzip(d: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(d).unwrap();
    e.finish().unwrap()
}

fn prepare(input: &Path, format: &str, out: &Path, skip_bad: bool) -> Result<()> {
    let o = serde_json::from_value(serde_json::json!({
        "input": input.display().to_string(),
        "out": out.display().to_string(),
        "format": format,
        "skipBad": skip_bad,
        "valFraction": 0.25,
        "recordsPerShard": 3,
    }))?;
    let ctx = biflow_core::JobCtx::silent();
    biflow_core::data::prepare(o, &Default::default(), &ctx)?;
    // What was prepared must open and read back.
    let ds = Dataset::open(out)?;
    for i in 0..ds.len(Split::Train).min(64) {
        ds.get(Split::Train, i)?;
    }
    Ok(())
}

/// A tar header block's checksum, recomputed.
fn fix_tar_checksum(block: &mut [u8]) {
    block[148..156].fill(b' ');
    let sum: u32 = block.iter().map(|&b| b as u32).sum();
    let s = format!("{sum:06o}\0 ");
    block[148..156].copy_from_slice(s.as_bytes());
}

fn mutate_tar(rng: &mut Rand, d: &mut Vec<u8>) {
    // Header blocks: 512-byte blocks with "ustar" at 257.
    let headers: Vec<usize> = (0..d.len() / 512)
        .map(|i| i * 512)
        .filter(|&o| d.get(o + 257..o + 262) == Some(b"ustar"))
        .collect();
    if headers.is_empty() || rng.gen_bool(0.3) {
        for _ in 0..rng.gen_range(1..=3) {
            mutate_once(rng, d, &[]);
        }
        return;
    }
    let o = headers[rng.gen_range(0..headers.len())];
    let b = &mut d[o..o + 512];
    match rng.gen_range(0..5) {
        0 => {
            let v = interesting(rng);
            let s = format!("{:011o}\0", v & 0o77777777777);
            b[124..136].copy_from_slice(s.as_bytes());
        }
        1 => {
            // base-256 size
            b[124] = 0x80;
            put_int(&mut b[124..136], 4, 8, interesting(rng), true);
        }
        2 => b[156] = [b'0', b'1', b'2', b'5', b'L', b'K', b'x', b'g', 0][rng.gen_range(0..9)],
        3 => {
            let names: &[&[u8]] = &[
                b"../../escape.png",
                b"/abs/x.png",
                b"a/b/c/d.png",
                b".hidden.png",
                b"x.PNG",
                b"dir/",
            ];
            let n = names[rng.gen_range(0..names.len())];
            b[..100].fill(0);
            b[..n.len()].copy_from_slice(n);
        }
        _ => mutate_once(rng, &mut b.to_vec(), &[]),
    }
    fix_tar_checksum(&mut d[o..o + 512]);
}

#[test]
fn fuzz_tar() {
    let tars = seeds::tars();
    let set = vec![("in.tar".to_string(), tars[0].clone())];
    fuzz_files(
        "tar",
        200,
        set,
        |rng, s| {
            s[0].1 = tars[rng.gen_range(0..tars.len())].clone();
            mutate_tar(rng, &mut s[0].1);
            if rng.gen_bool(0.3) {
                s[0] = ("in.tar.gz".into(), gzip(&s[0].1));
            }
        },
        |dir| {
            let f = std::fs::read_dir(dir)?
                .next()
                .ok_or_else(|| anyhow::anyhow!("no input"))??
                .path();
            prepare(&f, "tar", &dir.join("out"), f.metadata()?.len() % 2 == 0)
        },
    );
}

fn mutate_idx(rng: &mut Rand, files: &mut [(String, Vec<u8>)]) {
    let i = rng.gen_range(0..files.len());
    let f = &mut files[i].1;
    if rng.gen_bool(0.5) && f.len() >= 8 {
        let field = rng.gen_range(0..(f.len().min(16) / 4));
        let v = [
            0u64,
            1,
            2,
            3,
            28,
            16385,
            60000,
            0x7fff_ffff,
            0xffff_ffff,
            0x0000_0803,
            0x0000_0801,
        ][rng.gen_range(0..11)];
        put_int(f, field * 4, 4, v, true);
    } else {
        mutate_once(rng, f, &[]);
    }
    if rng.gen_bool(0.3) {
        let (name, d) = &files[i];
        files[i] = (format!("{name}.gz"), gzip(d));
    }
}

#[test]
fn fuzz_idx() {
    let sets = seeds::idx_sets();
    let named = |s: &Vec<Vec<u8>>| -> Vec<(String, Vec<u8>)> {
        ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"]
            .iter()
            .map(|n| n.to_string())
            .zip(s.iter().cloned())
            .collect()
    };
    fuzz_files(
        "idx",
        250,
        named(&sets[0]),
        |rng, s| {
            *s = named(&sets[rng.gen_range(0..sets.len())]);
            mutate_idx(rng, s);
        },
        |dir| prepare(dir, "idx", &dir.join("out"), false),
    );
}

#[test]
fn fuzz_npz_images() {
    let (archives, files) = npz_seeds();
    fuzz_files(
        "npz-images",
        400,
        vec![("in.npz".to_string(), files[0].clone())],
        |rng, s| {
            s[0].1 = npz_case(rng, &archives, &files);
        },
        |dir| prepare(&dir.join("in.npz"), "npz", &dir.join("out"), false),
    );
}

// ---------------------------------------------------------------------------------------------------------
// Prepared datasets (manifest.json, shards, labels.bin, val.idx) and run folders (config.json with weights,
// checkpoint state.json with its tensors and checksums)

/// Mutate one file of a framed set; JSON files get numbers and names changed more often.
fn mutate_files(rng: &mut Rand, files: &mut [(String, Vec<u8>)]) {
    let i = rng.gen_range(0..files.len());
    let (name, d) = &mut files[i];
    if name.ends_with(".json") && rng.gen_bool(0.7) {
        if rng.gen_bool(0.8) {
            replace_number(rng, d);
        } else {
            let t = String::from_utf8_lossy(d).into_owned();
            let swaps = [
                ("shard-00000.bin", "/dev/zero"),
                ("labels.bin", "../labels.bin"),
                ("val.idx", "."),
                ("sha256", "md5"),
                ("true", "false"),
                ("[", "[[[["),
            ];
            let (a, b) = swaps[rng.gen_range(0..swaps.len())];
            *d = t.replacen(a, b, 1).into_bytes();
        }
    } else {
        for _ in 0..rng.gen_range(1..=2) {
            mutate_once(rng, d, &[]);
        }
    }
}

#[test]
fn fuzz_dataset() {
    fuzz_files(
        "dataset",
        600,
        seeds::dataset_files(),
        |rng, s| mutate_files(rng, s),
        |dir| {
            let ds = Dataset::open(dir)?;
            for split in [Split::Train, Split::Val] {
                let n = ds.len(split).min(256);
                for i in 0..n {
                    ds.get(split, i)?;
                }
                ds.batch_f32(split, &(0..n.min(16)).collect::<Vec<_>>())?;
            }
            ds.verify()?;
            let grid = dir.join("grid.png").display().to_string();
            let o = serde_json::from_value(
                serde_json::json!({"dir": dir.display().to_string(), "grid": grid, "verify": true}),
            )?;
            biflow_core::data::inspect(o, &biflow_core::JobCtx::silent())?;
            Ok(())
        },
    );
}

#[test]
fn fuzz_run_config() {
    fuzz_files(
        "run-config",
        300,
        seeds::run_files(),
        |rng, s| {
            if rng.gen_bool(0.2) {
                mutate_safetensors(rng, &mut s[1].1);
            } else {
                mutate_files(rng, &mut s[..1]);
            }
        },
        |dir| {
            let run = biflow_core::run::Run::open(dir)?;
            run.load_flow(&candle_core::Device::Cpu).map(|_| ())
        },
    );
}

#[test]
fn fuzz_checkpoint() {
    fuzz_files(
        "checkpoint",
        300,
        seeds::checkpoint_files(),
        |rng, s| {
            let i = rng.gen_range(0..s.len());
            if s[i].0.ends_with(".safetensors") {
                mutate_safetensors(rng, &mut s[i].1);
                if rng.gen_bool(0.8) {
                    seeds::fix_checksum(s, i);
                }
            } else {
                mutate_files(rng, &mut s[i..i + 1]);
            }
        },
        |dir| {
            let c = biflow_core::run::Checkpoint {
                step: 1,
                dir: dir.to_path_buf(),
            };
            biflow_core::train::load_checkpoint(&c).map(|_| ())
        },
    );
}

/// metrics.jsonl as `plot_loss` reads it (fixtures/fuzz/metrics/huge-step.bin, a step of 1e300, once
/// made the hand-drawn plot loop for ~2^64 pixels).
#[test]
fn fuzz_metrics() {
    let seeds = seeds::metrics_files();
    fuzz_files(
        "metrics",
        300,
        vec![("metrics.jsonl".to_string(), seeds[0].clone())],
        |rng, s| {
            s[0].1 = seeds[rng.gen_range(0..seeds.len())].clone();
            for _ in 0..rng.gen_range(1..=3) {
                if rng.gen_bool(0.6) {
                    replace_number(rng, &mut s[0].1);
                } else {
                    mutate_once(rng, &mut s[0].1, &seeds);
                }
            }
        },
        |dir| biflow_core::train::plot_loss(&dir.join("metrics.jsonl"), &dir.join("loss.png")),
    );
}
