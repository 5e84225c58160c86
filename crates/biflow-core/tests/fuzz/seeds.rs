//! Valid inputs for every reader, built in code (small) or taken from fixtures/.

use std::io::Write;

use biflow_core::io::npy::Array;
use biflow_core::run::{encode_safetensors, HostTensor};

use crate::harness::repo_root;

/// Several files in one input: each as a u32 length and its bytes.
pub fn frame(parts: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts {
        out.extend((p.len() as u32).to_le_bytes());
        out.extend(p);
    }
    out
}

/// The files of a framed input (lengths past the end are cut short).
pub fn unframe(mut b: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let n = (u32::from_le_bytes(b[..4].try_into().unwrap()) as usize).min(b.len() - 4);
        out.push(b[4..4 + n].to_vec());
        b = &b[4 + n..];
    }
    out
}

pub fn zip_of(members: &[(String, Vec<u8>)], deflate: bool) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut buf);
        let method = if deflate {
            zip::CompressionMethod::Deflated
        } else {
            zip::CompressionMethod::Stored
        };
        let o = zip::write::SimpleFileOptions::default().compression_method(method);
        for (name, d) in members {
            // A name the writer refuses is left out.
            if z.start_file(name.as_str(), o).is_ok() {
                z.write_all(d).unwrap();
            }
        }
        z.finish().unwrap();
    }
    buf.into_inner()
}

// ---------------------------------------------------------------------------------------------------------
// PyTorch checkpoints

/// A checkpoint's parts: the state_dict pickle, the raw storages (key, bytes), and the container it goes in.
#[derive(Clone)]
pub struct Ckpt {
    pub pickle: Vec<u8>,
    pub storages: Vec<(String, Vec<u8>)>,
    pub legacy: bool,
}

/// A tensor to pickle: name, storage key, storage class, storage elements, offset, shape, stride.
struct T<'a>(
    &'a str,
    &'a str,
    &'a str,
    usize,
    usize,
    &'a [usize],
    &'a [usize],
);

fn p_str(p: &mut Vec<u8>, s: &str) {
    p.push(b'X');
    p.extend((s.len() as u32).to_le_bytes());
    p.extend(s.as_bytes());
}

fn p_int(p: &mut Vec<u8>, v: usize) {
    match v {
        0..=255 => p.extend([b'K', v as u8]),
        256..=65535 => {
            p.push(b'M');
            p.extend((v as u16).to_le_bytes());
        }
        _ => {
            p.extend([0x8a, 8]);
            p.extend((v as u64).to_le_bytes());
        }
    }
}

/// A state_dict pickle as torch.save writes one (protocol 2, OrderedDict, memo, BUILD with _metadata).
fn state_dict_pickle(tensors: &[T], legacy: bool, nested: bool) -> Vec<u8> {
    let mut p = vec![0x80, 2];
    p.extend(b"ccollections\nOrderedDict\nq\x00)Rq\x01(");
    for (i, t) in tensors.iter().enumerate() {
        p_str(&mut p, t.0);
        p.extend(
            b"ctorch._utils\n_rebuild_tensor_v2\nq\x02((X\x07\x00\x00\x00storageq\x03ctorch\n",
        );
        p.extend(t.2.as_bytes());
        p.extend(b"\nq\x04");
        p_str(&mut p, t.1);
        p_str(&mut p, "cpu");
        p_int(&mut p, t.3);
        if legacy {
            p.push(b'N');
        }
        p.extend(b"tQ");
        p_int(&mut p, t.4);
        p.push(b'(');
        t.5.iter().for_each(|&d| p_int(&mut p, d));
        p.extend(b"t(");
        t.6.iter().for_each(|&d| p_int(&mut p, d));
        p.extend(b"t\x89h\x00)RtR");
        p.extend([b'q', 5 + i as u8]);
    }
    p.push(b'u');
    if nested {
        // {"ema": {"w": <the first tensor again>}}
        p.extend(b"X\x03\x00\x00\x00ema}X\x01\x00\x00\x00wh\x05ss");
    }
    p.extend(b"}X\x09\x00\x00\x00_metadata}X\x00\x00\x00\x00}X\x07\x00\x00\x00versionK\x01ssb.");
    p
}

impl Ckpt {
    /// The zip and the legacy form of one state_dict.
    fn both(tensors: &[T], storages: Vec<(String, Vec<u8>)>, nested: bool) -> [Ckpt; 2] {
        [false, true].map(|legacy| Ckpt {
            pickle: state_dict_pickle(tensors, legacy, nested),
            storages: storages.clone(),
            legacy,
        })
    }

    /// The checkpoint file: a zip archive (stored or deflated members), or the legacy stream where `count`
    /// overrides the element count written before each storage.
    pub fn to_file(&self, deflate: bool, count: Option<u64>) -> Vec<u8> {
        if self.legacy {
            self.to_legacy(count)
        } else {
            self.to_zip(deflate)
        }
    }

    fn to_zip(&self, deflate: bool) -> Vec<u8> {
        let mut m = vec![
            ("archive/data.pkl".to_string(), self.pickle.clone()),
            ("archive/byteorder".to_string(), b"little".to_vec()),
        ];
        m.extend(
            self.storages
                .iter()
                .map(|(k, d)| (format!("archive/data/{k}"), d.clone())),
        );
        m.push(("archive/version".to_string(), b"3\n".to_vec()));
        zip_of(&m, deflate)
    }

    fn to_legacy(&self, count: Option<u64>) -> Vec<u8> {
        let mut f = vec![
            0x80, 2, 0x8a, 10, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, b'.',
        ];
        f.extend([0x80, 2, b'M', 0xe9, 0x03, b'.']);
        f.extend(b"\x80\x02}q\x00(X\x10\x00\x00\x00protocol_versionM\xe9\x03X\x0d\x00\x00\x00little_endian\x88u.");
        f.extend(&self.pickle);
        let mut keys = vec![0x80, 2, b']', b'('];
        for (k, _) in &self.storages {
            p_str(&mut keys, k);
        }
        keys.extend(b"e.");
        f.extend(keys);
        for (_, d) in &self.storages {
            f.extend(count.unwrap_or(d.len() as u64 / 4).to_le_bytes());
            f.extend(d);
        }
        f
    }
}

fn f32_bytes(n: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|i| (i as f32 * 0.5 - 1.0).to_le_bytes())
        .collect()
}

pub fn checkpoints() -> Vec<Ckpt> {
    let mut v = Vec::new();
    v.extend(Ckpt::both(
        &[
            T("layer.weight", "0", "FloatStorage", 12, 0, &[3, 4], &[4, 1]),
            T(
                "layer.weight_t",
                "0",
                "FloatStorage",
                12,
                0,
                &[4, 3],
                &[1, 4],
            ),
            T("layer.bias", "1", "FloatStorage", 3, 0, &[3], &[1]),
            T("slice", "0", "FloatStorage", 12, 5, &[2, 2], &[4, 1]),
        ],
        vec![("0".into(), f32_bytes(12)), ("1".into(), f32_bytes(3))],
        true,
    ));
    v.extend(Ckpt::both(
        &[
            T("scalar", "0", "FloatStorage", 1, 0, &[], &[]),
            T("expanded", "0", "FloatStorage", 1, 0, &[5], &[0]),
        ],
        vec![("0".into(), f32_bytes(1))],
        false,
    ));
    v
}

// ---------------------------------------------------------------------------------------------------------
// numpy

fn npy(a: &Array) -> Vec<u8> {
    let mut b = Vec::new();
    a.write(&mut b).unwrap();
    b
}

pub fn npys() -> Vec<Vec<u8>> {
    vec![
        npy(&Array::from_f32(vec![2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap()),
        npy(&Array::from_u8(vec![2, 2, 2, 3], (0..24).collect()).unwrap()),
        npy(&Array::from_i64(vec![4], &[1, -2, 3, i64::MAX]).unwrap()),
        npy(&Array::from_f64(vec![1], &[0.5]).unwrap()),
        npy(&Array::from_u8(vec![0], vec![]).unwrap()),
    ]
}

/// Image arrays as `data prepare` reads them, with labels; and the fixtures' .npz files.
pub fn npz_archives() -> Vec<Vec<(String, Vec<u8>)>> {
    let img = |shape: Vec<usize>| {
        let n = shape.iter().product();
        npy(&Array::from_u8(shape, (0..n).map(|i| (i * 7 % 256) as u8).collect()).unwrap())
    };
    let mut out = vec![
        vec![
            ("data.npy".to_string(), img(vec![4, 6, 6, 3])),
            (
                "labels.npy".to_string(),
                npy(&Array::from_i64(vec![4], &[0, 1, 1, 0]).unwrap()),
            ),
        ],
        vec![
            ("x.npy".to_string(), img(vec![3, 1, 5, 5])),
            (
                "y.npy".to_string(),
                npy(&Array::from_i64(vec![3, 1], &[1, 2, 3]).unwrap()),
            ),
        ],
        vec![("arr_0.npy".to_string(), img(vec![2, 3 * 4 * 4]))],
    ];
    for f in [
        "images-nhwc.npz",
        "images-nchw-deflate.npz",
        "float.npz",
        "rank5.npz",
    ] {
        let path = repo_root().join("fixtures/data").join(f);
        let mut z = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
        let members = (0..z.len())
            .map(|i| {
                let mut m = z.by_index(i).unwrap();
                let mut d = Vec::new();
                std::io::Read::read_to_end(&mut m, &mut d).unwrap();
                (m.name().map(|n| n.to_string()).unwrap_or_default(), d)
            })
            .collect();
        out.push(members);
    }
    out
}

// ---------------------------------------------------------------------------------------------------------
// safetensors, images, archives

pub fn safetensors_files() -> Vec<Vec<u8>> {
    let t = |shape: Vec<usize>| HostTensor {
        data: (0..shape.iter().product::<usize>())
            .map(|i| i as f32)
            .collect(),
        shape,
    };
    vec![
        encode_safetensors(&[("w".into(), t(vec![2, 3])), ("b".into(), t(vec![3]))]).unwrap(),
        encode_safetensors(&[("s".into(), t(vec![])), ("z".into(), t(vec![0, 4]))]).unwrap(),
    ]
}

fn encode(img: &image::DynamicImage, f: image::ImageFormat) -> Vec<u8> {
    let mut b = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut b), f).unwrap();
    b
}

pub fn images() -> Vec<Vec<u8>> {
    use image::{DynamicImage, ImageFormat};
    let rgb = DynamicImage::ImageRgb8(image::RgbImage::from_fn(7, 5, |x, y| {
        image::Rgb([(x * 30) as u8, (y * 40) as u8, 99])
    }));
    let grey = DynamicImage::ImageLuma8(image::GrayImage::from_fn(6, 6, |x, y| {
        image::Luma([(x * y * 7) as u8])
    }));
    let rgba = DynamicImage::ImageRgba8(image::RgbaImage::from_fn(4, 3, |x, _| {
        image::Rgba([1, 2, (x * 50) as u8, 128])
    }));
    let deep = DynamicImage::ImageRgb16(image::ImageBuffer::from_fn(3, 3, |x, _| {
        image::Rgb([x as u16 * 9000, 7, 65535])
    }));
    let mut v = vec![
        encode(&rgb, ImageFormat::Png),
        encode(&grey, ImageFormat::Png),
        encode(&rgba, ImageFormat::Png),
        encode(&deep, ImageFormat::Png),
        encode(&rgb, ImageFormat::Jpeg),
        encode(&grey, ImageFormat::Jpeg),
        encode(&rgba, ImageFormat::WebP),
        encode(&rgb, ImageFormat::WebP),
    ];
    for f in [
        "folder-flat/img0.png",
        "mixed-channels/a.png",
        "bad-image/truncated.png",
    ] {
        v.push(std::fs::read(repo_root().join("fixtures/data").join(f)).unwrap());
    }
    v
}

pub fn tars() -> Vec<Vec<u8>> {
    let imgs = images();
    let mut b = tar::Builder::new(Vec::new());
    let add = |b: &mut tar::Builder<Vec<u8>>, name: &str, d: &[u8]| {
        let mut h = tar::Header::new_ustar();
        h.set_size(d.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, d).unwrap();
    };
    add(&mut b, "cats/a.png", &imgs[0]);
    add(&mut b, "dogs/b.jpg", &imgs[4]);
    add(&mut b, "cats/notes.txt", b"hello");
    add(&mut b, "dogs/c.webp", &imgs[7]);
    let built = b.into_inner().unwrap();
    vec![
        built,
        std::fs::read(repo_root().join("fixtures/data/labelled.tar")).unwrap(),
    ]
}

/// MNIST-like idx pairs (images, labels).
pub fn idx_sets() -> Vec<Vec<Vec<u8>>> {
    let idx = |dims: &[u32], data: Vec<u8>| {
        let mut f = vec![0, 0, 8, dims.len() as u8];
        dims.iter().for_each(|d| f.extend(d.to_be_bytes()));
        f.extend(data);
        f
    };
    let mut sets = vec![vec![
        idx(&[5, 4, 4], (0..80).collect()),
        idx(&[5], vec![0, 1, 2, 1, 0]),
    ]];
    let dir = repo_root().join("fixtures/data/mnist-plain");
    if let (Ok(i), Ok(l)) = (
        std::fs::read(dir.join("train-images-idx3-ubyte")),
        std::fs::read(dir.join("train-labels-idx1-ubyte")),
    ) {
        sets.push(vec![i, l]);
    }
    sets
}

// ---------------------------------------------------------------------------------------------------------
// Prepared datasets and run folders

/// The files of a small prepared dataset (3 shards, a validation split), made by `data prepare`.
pub fn dataset_files() -> Vec<(String, Vec<u8>)> {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ds");
    let o = serde_json::from_value(serde_json::json!({
        "input": repo_root().join("fixtures/data/folder-labelled").display().to_string(),
        "out": out.display().to_string(),
        "valFraction": 0.3,
        "recordsPerShard": 1,
    }))
    .unwrap();
    biflow_core::data::prepare(o, &Default::default(), &biflow_core::JobCtx::silent()).unwrap();
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

fn tiny_model() -> biflow_core::models::flow::FlowConfig {
    serde_json::from_value(serde_json::json!({
        "imgSize": 4, "inChannels": 1, "patchSize": 2, "channels": 64, "numBlocks": 1, "layersPerBlock": 1, "numClasses": 2
    }))
    .unwrap()
}

fn tiny_weights() -> Vec<u8> {
    let params =
        biflow_core::models::flow::initial_parameters(&tiny_model(), 1, &candle_core::Device::Cpu).unwrap();
    let mut named: Vec<(String, HostTensor)> = params
        .into_iter()
        .map(|(n, t)| {
            (
                n,
                HostTensor {
                    shape: t.dims().to_vec(),
                    data: t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                },
            )
        })
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    encode_safetensors(&named).unwrap()
}

/// config.json and weights.safetensors of a tiny run.
pub fn run_files() -> Vec<(String, Vec<u8>)> {
    let cfg = biflow_core::run::RunConfig::tarflow(tiny_model());
    vec![
        (
            "config.json".into(),
            serde_json::to_vec_pretty(&cfg).unwrap(),
        ),
        ("weights.safetensors".into(), tiny_weights()),
    ]
}


/// A checkpoint folder: state.json first, then the three tensor files it checksums.
pub fn checkpoint_files() -> Vec<(String, Vec<u8>)> {
    let w = tiny_weights();
    let names = [
        "model.safetensors",
        "ema.safetensors",
        "optimizer.safetensors",
    ];
    let files: serde_json::Map<String, serde_json::Value> = names
        .iter()
        .map(|n| (n.to_string(), biflow_core::io::sha256_hex(&w).into()))
        .collect();
    let state = serde_json::json!({
        "version": 1, "step": 1, "adamSteps": 1,
        "data": {"epoch": 0, "offset": 16},
        "rng": {"seed": 1, "stream": 0, "wordPos": "1234"},
        "model": tiny_model(),
        "train": {
            "data": "d", "batchSize": 16, "steps": 10, "epochs": null, "lr": 0.001, "minLr": 0.0, "warmup": 1,
            "weightDecay": 0.0, "beta1": 0.9, "beta2": 0.95, "gradClip": 1.0, "emaDecay": 0.999, "noiseStd": 0.05,
            "dequantize": false, "dropLabel": 0.1, "seed": 1, "saveEvery": 1, "keep": 2, "limit": null
        },
        "files": files, "loss": 1.5, "elapsedSecs": 2.0
    });
    let mut v = vec![(
        "state.json".to_string(),
        serde_json::to_vec_pretty(&state).unwrap(),
    )];
    v.extend(names.iter().map(|n| (n.to_string(), w.clone())));
    v
}

/// Record file `i`'s new checksum in state.json (file 0), as an honest but hostile writer would.
pub fn fix_checksum(set: &mut [(String, Vec<u8>)], i: usize) {
    let Ok(mut state) = serde_json::from_slice::<serde_json::Value>(&set[0].1) else {
        return;
    };
    if let Some(files) = state.get_mut("files").and_then(|f| f.as_object_mut()) {
        files.insert(set[i].0.clone(), biflow_core::io::sha256_hex(&set[i].1).into());
        set[0].1 = serde_json::to_vec(&state).unwrap();
    }
}

pub fn metrics_files() -> Vec<Vec<u8>> {
    let mut a = String::new();
    for s in 1..=40 {
        a.push_str(&format!(
            "{{\"step\":{s},\"loss\":{},\"lr\":0.001,\"gradNorm\":1.5,\"imagesPerSec\":100.0}}\n",
            3.0 / s as f64
        ));
    }
    vec![
        a.into_bytes(),
        b"{\"step\":1,\"loss\":2.0}\n{\"step\":1,\"loss\":2.0}\n".to_vec(),
        Vec::new(),
    ]
}
