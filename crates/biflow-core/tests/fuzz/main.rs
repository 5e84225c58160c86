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
mod on_disk;
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
