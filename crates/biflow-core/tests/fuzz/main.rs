//! Fuzzing as a test (issue 11): a structure-aware mutation test for every reader that takes user bytes.
//! Each case must end in Ok or a clean error: never a panic (in any thread), an abort, or an allocation
//! over `harness::ALLOC_LIMIT`.
//!
//! - `cargo test --release -p biflow-core --test fuzz`: a fixed, seeded number of cases per reader.
//! - `BIFLOW_FUZZ_SECONDS=N` (or `npm run fuzz -- --minutes M`): each reader runs N seconds instead.
//! - `BIFLOW_FUZZ_SEED=S`: another seed. A case replays alone from (seed, reader, case number).
//!
//! A crashing input is saved to target/fuzz-crashes/; once fixed it belongs in fixtures/fuzz/<reader>/,
//! whose files every run replays first.

mod harness;
mod seeds;

use std::io::{Cursor, Read, Write};
use std::path::Path;

use anyhow::Result;
use biflow_core::data::{Dataset, Split};
use harness::{fuzz, mutate_generic, mutate_once, put_int, replace_number, Rand};
use rand::Rng;
use seeds::{frame, unframe, Ckpt};

// ---------------------------------------------------------------------------------------------------------
// PyTorch checkpoints (zip and legacy)

/// Pickle snippets that build, nest, share and call: inserted (sometimes many times over) into a valid pickle.
const PICKLE_SNIPPETS: &[&[u8]] = &[
    b"]",
    b"}",
    b")",
    b"(",
    b"t",
    b"l",
    b"d",
    b"a",
    b"e",
    b"s",
    b"u",
    b"0",
    b"1",
    b"2",
    b"N",
    b"R",
    b"Q",
    b"b",
    b"\x85",
    b"\x86",
    b"\x87",
    b"\x88",
    b"\x94",
    b"\x93",
    b"\x81",
    b"h\x00",
    b"h\x01",
    b"h\x02",
    b"q\x00",
    b"q\x01",
    b"j\xff\xff\xff\xff",
    b"r\xff\xff\xff\x7f",
    b"K\xff",
    b"J\xff\xff\xff\xff",
    b"M\xff\xff",
    b"\x8a\x08\xff\xff\xff\xff\xff\xff\xff\x7f",
    b"\x8a\x01\xff",
    b"X\xff\xff\xff\x7f",
    b"X\x00\x00\x00\x00",
    b"\x8d\xff\xff\xff\xff\xff\xff\xff\xff",
    b"\x8e\x00\x00\x00\x00\x00\x00\x00\x80",
    b"\x95\xff\xff\xff\xff\xff\xff\xff\xff",
    b"ctorch._utils\n_rebuild_tensor_v2\n",
    b"ctorch\nFloatStorage\n",
    b"ccollections\nOrderedDict\n",
    b"cos\nsystem\n",
    b"\x8c\x08builtins\x8c\x04eval\x93",
    b"I99999999999999999999\n",
    b"F1e999\n",
    b"p4294967296\n",
    b"g-1\n",
    b".",
    b"\x80\x05",
    b"\x80\x09",
    b"]\x94a",
    b"}\x94h\x00X\x01\x00\x00\x00ks",
];

fn mutate_pickle(rng: &mut Rand, p: &mut Vec<u8>) {
    for _ in 0..rng.gen_range(1..=3) {
        if rng.gen_bool(0.5) {
            let s = PICKLE_SNIPPETS[rng.gen_range(0..PICKLE_SNIPPETS.len())];
            let times = [1, 1, 1, 2, 10, 1000, 100_000][rng.gen_range(0..7)];
            let at = rng.gen_range(0..=p.len());
            let rep: Vec<u8> = s.iter().copied().cycle().take(s.len() * times).collect();
            p.splice(at..at, rep);
        } else {
            mutate_once(rng, p, &[]);
        }
    }
}

fn ckpt_case(rng: &mut Rand, ckpts: &[Ckpt], files: &[Vec<u8>]) -> Vec<u8> {
    if rng.gen_bool(0.3) {
        return mutate_generic(rng, files);
    }
    let mut c = ckpts[rng.gen_range(0..ckpts.len())].clone();
    if rng.gen_bool(0.85) {
        mutate_pickle(rng, &mut c.pickle);
    }
    if rng.gen_bool(0.2) && !c.storages.is_empty() {
        let i = rng.gen_range(0..c.storages.len());
        mutate_once(rng, &mut c.storages[i].1, &[]);
    }
    let count = rng.gen_bool(0.1).then(|| interesting(rng));
    c.to_file(rng.gen_bool(0.5), count)
}

fn interesting(rng: &mut Rand) -> u64 {
    harness::interesting_u64(rng)
}

#[test]
fn fuzz_pickle() {
    let ckpts = seeds::checkpoints();
    let mut files: Vec<Vec<u8>> = ckpts.iter().map(|c| c.to_file(false, None)).collect();
    files.push(
        std::fs::read(
            harness::repo_root().join("fixtures/fid-reference/fid-inception-formula-subset.pth"),
        )
        .unwrap(),
    );
    fuzz(
        "pickle",
        3000,
        &files,
        |rng, files| ckpt_case(rng, &ckpts, files),
        |b| biflow_core::io::pickle::read_state_dict_bytes(b).map(|_| ()),
    );
}

// ---------------------------------------------------------------------------------------------------------
// .npy and .npz

const DESCRS: &[&str] = &[
    "<f4", "<f8", "|u1", "|i1", "|b1", "<f2", "<i8", "<u8", ">f4", "<c8", "O", "<U3", "", "<",
    "|V8",
];

fn mutate_npy(rng: &mut Rand, npy: &mut Vec<u8>) {
    let text_end = npy.iter().position(|&b| b == b'\n').unwrap_or(npy.len());
    let header = String::from_utf8_lossy(&npy[..text_end]).into_owned();
    let new = match rng.gen_range(0..5) {
        0 => {
            let dims: Vec<String> = (0..rng.gen_range(0..5))
                .map(|_| harness::interesting_decimal(rng))
                .collect();
            header
                .find("'shape': (")
                .and_then(|s| header[s..].find(')').map(|e| (s, s + e)))
                .map(|(s, e)| {
                    format!(
                        "{}'shape': ({},{}",
                        &header[..s],
                        dims.join(", "),
                        &header[e..]
                    )
                })
        }
        1 => header.find("'descr': '").map(|s| {
            let rest = &header[s + 10..];
            let e = rest.find('\'').unwrap_or(0);
            format!(
                "{}'descr': '{}{}",
                &header[..s],
                DESCRS[rng.gen_range(0..DESCRS.len())],
                &rest[e..]
            )
        }),
        2 => Some(header.replace("False", "True")),
        _ => None,
    };
    match new {
        Some(h) if rng.gen_bool(0.7) => {
            // Keep the header length field honest (or not).
            let mut out = npy[..8.min(npy.len())].to_vec();
            let body = h.as_bytes().get(10..).unwrap_or(&[]).to_vec();
            out.extend((body.len() as u16 + 1).to_le_bytes());
            out.extend(body);
            out.extend(&npy[text_end.min(npy.len())..]);
            *npy = out;
        }
        Some(h) => npy.splice(..text_end, h.into_bytes()).for_each(drop),
        None => {
            for _ in 0..rng.gen_range(1..=3) {
                mutate_once(rng, npy, &[]);
            }
        }
    }
}

fn read_npy_all(b: &[u8]) -> Result<()> {
    let a = biflow_core::io::npy::Array::read(&mut Cursor::new(b))?;
    let _ = (a.to_f32(), a.to_i64());
    Ok(())
}

#[test]
fn fuzz_npy() {
    let npys = seeds::npys();
    fuzz(
        "npy",
        10000,
        &npys,
        |rng, s| {
            let mut d = s[rng.gen_range(0..s.len())].clone();
            mutate_npy(rng, &mut d);
            d
        },
        read_npy_all,
    );
}

/// An .npz (zip) from members, stored or deflated.
fn npz_case(rng: &mut Rand, archives: &[Vec<(String, Vec<u8>)>], files: &[Vec<u8>]) -> Vec<u8> {
    if rng.gen_bool(0.3) {
        return mutate_generic(rng, files);
    }
    let mut members = archives[rng.gen_range(0..archives.len())].clone();
    let i = rng.gen_range(0..members.len());
    mutate_npy(rng, &mut members[i].1);
    if rng.gen_bool(0.1) {
        members[i].0 = [
            "data.npy",
            "labels.npy",
            "x.npy",
            "../../evil.npy",
            "arr_0",
            "",
        ][rng.gen_range(0..6)]
        .into();
    }
    seeds::zip_of(&members, rng.gen_bool(0.5))
}

fn read_npz_all(b: &[u8]) -> Result<()> {
    let mut npz = biflow_core::io::npy::Npz::from_reader(Cursor::new(b), "fuzz.npz".into())?;
    for name in npz.names() {
        if let Ok(a) = npz.read(&name) {
            let _ = a.to_f64();
        }
        if let Ok((_, _, mut r)) = npz.open_member(&name) {
            let mut buf = [0u8; 4096];
            while r.read(&mut buf).map(|n| n > 0).unwrap_or(false) {}
        }
    }
    Ok(())
}

/// The .npz seeds: their members, and the archives.
fn npz_seeds() -> (Vec<Vec<(String, Vec<u8>)>>, Vec<Vec<u8>>) {
    let archives = seeds::npz_archives();
    let files = archives.iter().map(|m| seeds::zip_of(m, false)).collect();
    (archives, files)
}

#[test]
fn fuzz_npz() {
    let (archives, files) = npz_seeds();
    fuzz(
        "npz",
        5000,
        &files,
        |rng, f| npz_case(rng, &archives, f),
        read_npz_all,
    );
}

// ---------------------------------------------------------------------------------------------------------
// safetensors

fn mutate_safetensors(rng: &mut Rand, d: &mut Vec<u8>) {
    if d.len() < 8 || rng.gen_bool(0.3) {
        mutate_once(rng, d, &[]);
        return;
    }
    let n = (u64::from_le_bytes(d[..8].try_into().unwrap()) as usize).min(d.len() - 8);
    let mut header = d[8..8 + n].to_vec();
    let data = d[8 + n..].to_vec();
    match rng.gen_range(0..4) {
        0 | 1 => replace_number(rng, &mut header),
        2 => {
            let h = String::from_utf8_lossy(&header).replace(
                "\"F32\"",
                ["\"F64\"", "\"BF16\"", "\"I8\"", "\"BOOL\"", "\"Q\""][rng.gen_range(0..5)],
            );
            header = h.into_bytes();
        }
        _ => mutate_once(rng, &mut header, &[]),
    }
    let mut out = if rng.gen_bool(0.8) {
        (header.len() as u64).to_le_bytes().to_vec()
    } else {
        interesting(rng).to_le_bytes().to_vec()
    };
    out.extend(header);
    out.extend(data);
    *d = out;
}

#[test]
fn fuzz_safetensors() {
    let files = seeds::safetensors_files();
    fuzz(
        "safetensors",
        10000,
        &files,
        |rng, s| {
            let mut d = s[rng.gen_range(0..s.len())].clone();
            mutate_safetensors(rng, &mut d);
            d
        },
        |b| biflow_core::run::decode_safetensors(b).map(|_| ()),
    );
}

// ---------------------------------------------------------------------------------------------------------
// Images: PNG (chunk-aware, CRCs fixed), JPEG, WebP

fn mutate_png(rng: &mut Rand, d: &mut Vec<u8>) {
    // chunks: (start of length field, data length)
    let mut chunks = Vec::new();
    let mut pos = 8;
    while pos + 12 <= d.len() {
        let n = u32::from_be_bytes(d[pos..pos + 4].try_into().unwrap()) as usize;
        if pos + 12 + n > d.len() {
            break;
        }
        chunks.push((pos, n));
        pos += 12 + n;
    }
    if chunks.is_empty() {
        mutate_once(rng, d, &[]);
        return;
    }
    let (at, n) = chunks[rng.gen_range(0..chunks.len())];
    let mut data = d[at + 8..at + 8 + n].to_vec();
    let kind = d[at + 4..at + 8].to_vec();
    if &kind == b"IHDR" && rng.gen_bool(0.6) && data.len() >= 13 {
        let field = rng.gen_range(0..4);
        match field {
            0 | 1 => put_int(
                &mut data,
                field * 4,
                4,
                [1, 16385, 60000, 0x7fff_ffff, 0][rng.gen_range(0..5)],
                true,
            ),
            2 => data[8] = [1, 2, 4, 8, 16, 3][rng.gen_range(0..6)],
            _ => data[9] = [0, 2, 3, 4, 6, 7][rng.gen_range(0..6)],
        }
    } else {
        mutate_once(rng, &mut data, &[]);
    }
    let mut chunk = (data.len() as u32).to_be_bytes().to_vec();
    chunk.extend(&kind);
    chunk.extend(&data);
    let mut crc = flate2::Crc::new();
    crc.update(&kind);
    crc.update(&data);
    chunk.extend(crc.sum().to_be_bytes());
    d.splice(at..at + 12 + n, chunk);
}

#[test]
fn fuzz_images() {
    let files = seeds::images();
    fuzz(
        "images",
        5000,
        &files,
        |rng, s| {
            let mut d = s[rng.gen_range(0..s.len())].clone();
            if d.starts_with(b"\x89PNG") && rng.gen_bool(0.7) {
                mutate_png(rng, &mut d);
            } else {
                for _ in 0..rng.gen_range(1..=3) {
                    mutate_once(rng, &mut d, s);
                }
            }
            d
        },
        |b| biflow_core::data::decode_image_bytes(b).map(|_| ()),
    );
}

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
    biflow_core::data::prepare(o, &ctx)?;
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
