//! Writer/reader round trips, checksums, splits, bounded memory, and every decoder on tiny inputs.

use std::path::Path;

use super::prepare::choose_val;
use super::*;

/// Write `records` (pixels, label) as a dataset in `dir` through the shard writer.
fn write_dataset(dir: &Path, shape: (usize, usize, usize), records: &[(Vec<u8>, i64)], classes: usize, val: &[u32], per_shard: usize) -> Manifest {
    let (c, h, w) = shape;
    let mut wr = ShardWriter::create(dir, c * h * w, per_shard).unwrap();
    let mut counts = vec![0; classes];
    for (px, l) in records {
        wr.push(px, *l).unwrap();
        if *l >= 0 {
            counts[*l as usize] += 1;
        }
    }
    let s = wr.finish(None, val).unwrap();
    let m = Manifest {
        format: FORMAT_NAME.into(),
        version: FORMAT_VERSION,
        count: s.count,
        height: h,
        width: w,
        channels: c,
        classes: (0..classes).map(|i| ClassInfo { name: format!("c{i}"), count: counts[i] }).collect(),
        splits: Splits {
            train: SplitInfo { count: s.count - val.len() },
            val: SplitInfo { count: val.len() },
            val_fraction: 0.0,
            seed: 0,
            method: "test".into(),
        },
        source: SourceInfo { kind: "test".into(), input: "test".into(), size: None, resize: "none".into(), limit: None },
        record_bytes: c * h * w,
        records_per_shard: s.records_per_shard,
        shards: s.shards,
        labels_file: s.labels_file,
        val_file: s.val_file,
        checksum: Checksum { algorithm: "sha256".into(), value: s.checksum, covers: "test".into() },
        skipped: vec![],
        latent: None,
    };
    m.write(dir).unwrap();
    m
}

fn rec(i: usize, n: usize) -> Vec<u8> {
    (0..n).map(|k| ((i * 31 + k * 7) % 256) as u8).collect()
}

#[test]
fn shard_round_trip_with_splits_and_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let shape = (3, 4, 5);
    let records: Vec<(Vec<u8>, i64)> = (0..23).map(|i| (rec(i, 60), (i % 3) as i64)).collect();
    let val = vec![2u32, 7, 19];
    write_dataset(dir.path(), shape, &records, 3, &val, 5);
    let ds = Dataset::open(dir.path()).unwrap();
    assert_eq!(ds.manifest.shards.len(), 5);
    assert_eq!(ds.len(Split::Train), 20);
    assert_eq!(ds.len(Split::Val), 3);
    let (px, l) = ds.get(Split::Val, 1).unwrap();
    assert_eq!((px, l), records[7].clone());
    // train index 2 skips val record 2 -> record 3
    let (px, l) = ds.get(Split::Train, 2).unwrap();
    assert_eq!((px, l), records[3].clone());
    let (last, _) = ds.get(Split::Train, 19).unwrap();
    assert_eq!(last, records[22].0);
    assert!(ds.get(Split::Train, 20).unwrap_err().to_string().contains("out of range"));
    // batch_f32: x/127.5 - 1, C,H,W concatenated
    let (x, labels) = ds.batch_f32(Split::Train, &[0, 2]).unwrap();
    assert_eq!(x.len(), 120);
    assert_eq!(labels, vec![0, 0]);
    assert!((x[60] - (records[3].0[0] as f32 / 127.5 - 1.0)).abs() < 1e-6);
    ds.verify().unwrap();
    assert_eq!("val".parse::<Split>().unwrap(), Split::Val);
    assert_eq!(serde_json::to_string(&Split::Train).unwrap(), "\"train\"");

    // corrupt one byte: verify fails; truncate a shard: open fails
    let shard = dir.path().join(&ds.manifest.shards[1].file);
    drop(ds);
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes[3] ^= 1;
    std::fs::write(&shard, &bytes).unwrap();
    let err = Dataset::open(dir.path()).unwrap().verify().unwrap_err().to_string();
    assert!(err.contains("checksum"), "{err}");
    bytes.pop();
    std::fs::write(&shard, &bytes).unwrap();
    let err = Dataset::open(dir.path()).err().unwrap().to_string();
    assert!(err.contains("damaged"), "{err}");
}

#[test]
fn open_rejects_what_is_not_a_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let err = Dataset::open(dir.path()).err().unwrap().to_string();
    assert!(err.contains("not a biflow dataset"), "{err}");
    std::fs::write(dir.path().join("manifest.json"), "{\"format\": \"other\"}").unwrap();
    let err = Dataset::open(dir.path()).err().unwrap().to_string();
    assert!(err.contains("not a biflow dataset"), "{err}");
    std::fs::write(dir.path().join("manifest.json"), "{\"format\": \"biflow-dataset\", \"version\": 99}").unwrap();
    let err = Dataset::open(dir.path()).err().unwrap().to_string();
    assert!(err.contains("version 99"), "{err}");
}

#[test]
fn writer_memory_stays_bounded_on_a_large_set() {
    let dir = tempfile::tempdir().unwrap();
    let rb = 48; // 4x4x3
    let mut wr = ShardWriter::create(dir.path(), rb, 50_000).unwrap();
    let cap = wr.buffer_capacity();
    let mut peak = 0;
    let px = vec![9u8; rb];
    for i in 0..200_000 {
        wr.push(&px, (i % 10) as i64).unwrap();
        peak = peak.max(wr.buffered_bytes());
    }
    assert!(peak <= cap, "buffered {peak} > capacity {cap}");
    assert!(peak < 2 << 20, "buffered {peak} bytes for 200k records");
    let s = wr.finish(None, &[]).unwrap();
    assert_eq!(s.count, 200_000);
    assert_eq!(s.shards.len(), 4);
    let total: u64 = s.shards.iter().map(|sh| std::fs::metadata(dir.path().join(&sh.file)).unwrap().len()).sum();
    assert_eq!(total, 200_000 * rb as u64);
}

#[test]
fn val_split_is_deterministic_and_exact() {
    let a = choose_val(1000, 0.1, 7);
    assert_eq!(a.len(), 100);
    assert_eq!(a, choose_val(1000, 0.1, 7));
    assert_ne!(a, choose_val(1000, 0.1, 8));
    assert!(a.windows(2).all(|w| w[0] < w[1]) && *a.last().unwrap() < 1000);
    assert!(choose_val(1000, 0.0, 7).is_empty());
    assert_eq!(choose_val(3, 0.01, 1).len(), 1);
}

#[test]
fn label_remap_is_applied_and_checksummed() {
    let dir = tempfile::tempdir().unwrap();
    let mut wr = ShardWriter::create(dir.path(), 2, 10).unwrap();
    for l in [0i64, 1, 0, -1] {
        wr.push(&[1, 2], l).unwrap();
    }
    let remap = |l: i32| if l < 0 { l } else { 1 - l };
    let s = wr.finish(Some(&remap), &[]).unwrap();
    let labels = std::fs::read(dir.path().join(LABELS_FILE)).unwrap();
    let got: Vec<i32> = labels.chunks(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(got, vec![1, 0, 1, -1]);
    assert_eq!(s.checksum.len(), 64);
}

// ---------------------------------------------------------------------------------------------
// Decoders, through the data.prepare job, on the fixtures in fixtures/data/

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/data").join(name)
}

fn prep(input: &Path, out: &Path, extra: serde_json::Value) -> anyhow::Result<serde_json::Value> {
    let mut o = serde_json::json!({ "input": input.to_str().unwrap(), "out": out.to_str().unwrap() });
    for (k, v) in extra.as_object().unwrap() {
        o[k] = v.clone();
    }
    crate::jobs::run("data.prepare", o, &crate::JobCtx::silent())
}

fn no_leftovers(parent: &Path) {
    let names: Vec<String> = std::fs::read_dir(parent).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(names.iter().all(|n| !n.starts_with('.')), "staging left behind: {names:?}");
}

#[test]
fn labelled_folder_tar_and_tgz_give_the_same_dataset() {
    let tmp = tempfile::tempdir().unwrap();
    let mut sums = Vec::new();
    for (i, input) in ["folder-labelled", "labelled.tar", "labelled.tar.gz", "labelled.tgz"].iter().enumerate() {
        let out = tmp.path().join(format!("ds{i}"));
        let r = prep(&fixture(input), &out, serde_json::json!({})).unwrap();
        assert_eq!(r["count"], 6, "{input}");
        let ds = Dataset::open(&out).unwrap();
        let m = &ds.manifest;
        assert_eq!((m.channels, m.height, m.width), (3, 8, 8));
        assert_eq!(m.classes, vec![ClassInfo { name: "cat".into(), count: 3 }, ClassInfo { name: "dog".into(), count: 3 }]);
        // class "dog" pixels have red channel 200; the record's first plane is red
        for j in 0..6 {
            let (px, l) = ds.get(Split::Train, j).unwrap();
            assert_eq!(px[0], if l == 1 { 200 } else { 0 }, "{input} record {j}");
        }
        ds.verify().unwrap();
        sums.push((input.to_string(), m.checksum.value.clone()));
    }
    // the folder is read in sorted order; the archives list dog before cat, so only the label
    // counts agree, not the order; the two gzip archives hold the same tar
    assert_eq!(sums[2].1, sums[3].1);
    assert_eq!(sums[1].1, sums[2].1);
    no_leftovers(tmp.path());
}

#[test]
fn flat_folder_is_unlabelled_and_resizes() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("flat");
    prep(&fixture("folder-flat"), &out, serde_json::json!({"size": 4, "channels": 3, "valFraction": 0.25, "seed": 3})).unwrap();
    let ds = Dataset::open(&out).unwrap();
    assert!(ds.manifest.classes.is_empty());
    assert_eq!((ds.manifest.channels, ds.manifest.height), (3, 4));
    assert_eq!((ds.len(Split::Train), ds.len(Split::Val)), (3, 1));
    let (px, l) = ds.get(Split::Train, 0).unwrap();
    assert_eq!((px.len(), l), (48, -1));
    // grey replicated to RGB: the three planes are equal
    assert_eq!(px[..16], px[16..32]);
}

#[test]
fn npz_layouts_and_compression() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    prep(&fixture("images-nhwc.npz"), &a, serde_json::json!({})).unwrap();
    let ds = Dataset::open(&a).unwrap();
    assert_eq!((ds.manifest.channels, ds.manifest.height, ds.manifest.width, ds.manifest.count), (3, 6, 6, 5));
    assert_eq!(ds.manifest.classes.iter().map(|c| c.count).collect::<Vec<_>>(), vec![2, 2, 1]);
    let (px, l) = ds.get(Split::Train, 1).unwrap();
    // value at (i, y, x, c) = (i*50 + y*6 + x + c) % 256, stored as C,H,W
    assert_eq!(l, 1);
    assert_eq!(px[0], 50);
    assert_eq!(px[36 + 7], (50 + 6 + 1 + 1) as u8);

    let b = tmp.path().join("b");
    prep(&fixture("images-nchw-deflate.npz"), &b, serde_json::json!({"limit": 4})).unwrap();
    let ds = Dataset::open(&b).unwrap();
    assert_eq!(ds.manifest.count, 4);
    assert_eq!(ds.manifest.classes.len(), 4);
    let (px, l) = ds.get(Split::Train, 2).unwrap();
    assert_eq!(l, 1);
    assert_eq!(px[36 * 2 + 6 + 1], (100 + 40 + 6 + 1) as u8);
}

#[test]
fn mnist_idx_gzipped_or_not() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    prep(&fixture("mnist-gz"), &a, serde_json::json!({})).unwrap();
    let ds = Dataset::open(&a).unwrap();
    assert_eq!((ds.manifest.channels, ds.manifest.height, ds.manifest.count, ds.manifest.classes.len()), (1, 28, 10, 10));
    assert_eq!(ds.manifest.source.kind, "idx");
    let (px, l) = ds.get(Split::Train, 3).unwrap();
    assert_eq!(l, 3);
    assert_eq!(px[1], (((3 * 17 + 1) % 7) * 36) as u8);
    let b = tmp.path().join("b");
    prep(&fixture("mnist-plain"), &b, serde_json::json!({"channels": 3, "size": 4})).unwrap();
    let ds = Dataset::open(&b).unwrap();
    assert_eq!((ds.manifest.channels, ds.manifest.height, ds.manifest.count, ds.manifest.classes.len()), (3, 4, 6, 3));
}

fn err_of(input: &str, extra: serde_json::Value) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let e = format!("{:#}", prep(&fixture(input), &out, extra).unwrap_err());
    assert!(!out.exists(), "{input}: output left behind after: {e}");
    no_leftovers(tmp.path());
    e
}

#[test]
fn bad_inputs_are_one_clear_error_and_leave_nothing() {
    let e = err_of("bad-image", serde_json::json!({}));
    assert!(e.contains("truncated.png") && e.contains("--skip-bad"), "{e}");
    let e = err_of("mixed-sizes", serde_json::json!({}));
    assert!(e.contains("different sizes") && e.contains("--size"), "{e}");
    let e = err_of("empty", serde_json::json!({}));
    assert!(e.contains("no images found"), "{e}");
    let e = err_of("truncated.tar", serde_json::json!({}));
    assert!(e.contains("truncated"), "{e}");
    let e = err_of("float.npz", serde_json::json!({}));
    assert!(e.contains("float32") && e.contains("uint8"), "{e}");
    let e = err_of("rank5.npz", serde_json::json!({}));
    assert!(e.contains("shape"), "{e}");
    let e = err_of("mixed-channels", serde_json::json!({}));
    assert!(e.contains("b.png is a colour image") && e.contains("--channels 3"), "{e}");
    let e = err_of("folder-flat", serde_json::json!({"channels": 2}));
    assert!(e.contains("--channels"), "{e}");
}

#[test]
fn skip_bad_lists_skipped_files_and_sizes_resize() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let r = prep(&fixture("bad-image"), &out, serde_json::json!({"skipBad": true})).unwrap();
    assert_eq!((r["count"].as_u64(), r["skipped"].as_u64()), (Some(2), Some(1)));
    let ds = Dataset::open(&out).unwrap();
    assert_eq!(ds.manifest.skipped.len(), 1);
    assert!(ds.manifest.skipped[0].path.ends_with("truncated.png"));
    let out3 = tmp.path().join("o3");
    prep(&fixture("mixed-channels"), &out3, serde_json::json!({"channels": 3})).unwrap();
    assert_eq!(Dataset::open(&out3).unwrap().manifest.channels, 3);
    let out2 = tmp.path().join("o2");
    prep(&fixture("mixed-sizes"), &out2, serde_json::json!({"size": 5})).unwrap();
    assert_eq!(Dataset::open(&out2).unwrap().manifest.height, 5);
}

#[test]
fn existing_output_needs_force_and_survives_failures() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ds");
    prep(&fixture("folder-flat"), &out, serde_json::json!({})).unwrap();
    let before = std::fs::read(out.join(MANIFEST)).unwrap();
    let e = format!("{:#}", prep(&fixture("folder-labelled"), &out, serde_json::json!({})).unwrap_err());
    assert!(e.contains("already exists") && e.contains("--force"), "{e}");
    // a failing run with --force leaves the old dataset untouched
    prep(&fixture("mixed-sizes"), &out, serde_json::json!({"force": true})).unwrap_err();
    assert_eq!(std::fs::read(out.join(MANIFEST)).unwrap(), before);
    prep(&fixture("folder-labelled"), &out, serde_json::json!({"force": true})).unwrap();
    assert_eq!(Dataset::open(&out).unwrap().manifest.classes.len(), 2);
    no_leftovers(tmp.path());
}

#[test]
fn jpeg_and_webp_decode() {
    use super::decode::{decode, Item, Label, Payload};
    let img = image::RgbImage::from_fn(16, 12, |x, y| image::Rgb([(x * 15) as u8, (y * 20) as u8, 128]));
    for fmt in [image::ImageFormat::Jpeg, image::ImageFormat::WebP, image::ImageFormat::Png] {
        let mut buf = Vec::new();
        image::DynamicImage::ImageRgb8(img.clone()).write_to(&mut std::io::Cursor::new(&mut buf), fmt).unwrap();
        let item = Item { name: "x".into(), payload: Payload::Bytes(buf.clone()), label: Label::None };
        let d = decode(&item).unwrap().to_rgb8();
        assert_eq!(d.dimensions(), (16, 12), "{fmt:?}");
        let diff = d.get_pixel(8, 6)[0] as i32 - img.get_pixel(8, 6)[0] as i32;
        assert!(diff.abs() < 12, "{fmt:?}: {diff}");
        for keep in [buf.len() / 3, buf.len() * 9 / 10] {
            let item = Item { name: "cut.img".into(), payload: Payload::Bytes(buf[..keep].to_vec()), label: Label::None };
            let e = format!("{:#}", decode(&item).unwrap_err());
            assert!(e.contains("cut.img"), "{fmt:?}: {e}");
        }
    }
}

#[test]
fn inspect_writes_a_grid_with_a_row_per_class() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ds");
    prep(&fixture("folder-labelled"), &out, serde_json::json!({})).unwrap();
    let r = crate::jobs::run("data.inspect", serde_json::json!({"dir": out.to_str().unwrap(), "perRow": 4, "verify": true}), &crate::JobCtx::silent()).unwrap();
    assert_eq!(r["gridRows"], 2);
    let grid = image::open(out.join("preview.png")).unwrap();
    assert_eq!((grid.width(), grid.height()), (4 * 10 + 2, 2 * 10 + 2));
}

#[test]
fn cancelled_prepare_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ds");
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let ctx = crate::JobCtx::new(|_| {}, cancel);
    let o = serde_json::json!({ "input": fixture("folder-labelled").to_str().unwrap(), "out": out.to_str().unwrap() });
    let e = crate::jobs::run("data.prepare", o, &ctx).unwrap_err();
    assert!(e.is::<crate::Cancelled>(), "{e:#}");
    assert!(!out.exists());
    no_leftovers(tmp.path());
}

#[test]
fn large_synthetic_folder_round_trips_through_several_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let pngs = tmp.path().join("pngs");
    synth_pngs(&pngs, 600, 8, 3, 9).unwrap();
    let out = tmp.path().join("ds");
    let r = prep(&pngs, &out, serde_json::json!({"recordsPerShard": 64, "valFraction": 0.1, "size": 48})).unwrap();
    assert_eq!(r["count"], 600);
    let ds = Dataset::open(&out).unwrap();
    assert_eq!(ds.manifest.shards.len(), 10);
    assert_eq!(ds.manifest.classes.len(), 3);
    assert_eq!((ds.len(Split::Train), ds.len(Split::Val)), (540, 60));
    ds.verify().unwrap();
    // the record of file class001/000001.png is the decoded PNG (upscaled 8 -> 48), as C,H,W
    let img = image::open(pngs.join("class001/000001.png")).unwrap().to_rgb8();
    let r = (0..600).find(|&r| ds.record(r).1 == 1).unwrap();
    let (px, _) = ds.record(r);
    let near = |a: u8, b: u8| (a as i32 - b as i32).abs() <= 40;
    assert!(near(px[3 * 48 + 3], img.get_pixel(0, 0)[0]), "{} vs {}", px[0], img.get_pixel(0, 0)[0]);
    assert!(near(px[48 * 48 + 27 * 48 + 27], img.get_pixel(4, 4)[1]));
    // a large batch goes through the parallel path and matches the serial one
    let idx: Vec<usize> = (0..200).collect();
    let (x, labels) = ds.batch_f32(Split::Train, &idx).unwrap();
    assert_eq!(x.len(), 200 * 48 * 48 * 3);
    let (x1, l1) = ds.batch_f32(Split::Train, &idx[150..151]).unwrap();
    assert_eq!(&x[150 * 6912..151 * 6912], &x1[..]);
    assert_eq!(labels[150], l1[0]);
}

#[test]
fn dataset_is_shareable_between_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Dataset>();
}

/// A disk that fills part way through `data prepare` (shards, labels, manifest): the dataset already at
/// --out stays whole and loadable, the error names the file and the cause, no staging folder is left.
#[test]
fn a_full_disk_during_prepare_keeps_the_previous_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ds");
    let opts = serde_json::json!({"recordsPerShard": 2, "valFraction": 0.25, "force": true});
    prep(&fixture("folder-labelled"), &out, opts.clone()).unwrap();
    let manifest = std::fs::read(out.join(MANIFEST)).unwrap();
    for cut in [0u64, 1, 50, 200, 400] {
        crate::io::atomic::fail_writes_after(Some(cut));
        let r = prep(&fixture("folder-flat"), &out, opts.clone());
        crate::io::atomic::fail_writes_after(None);
        let err = format!("{:#}", r.unwrap_err());
        assert!(err.contains("no space left") && err.contains(".ds.partial-"), "cut {cut}: {err}");
        assert_eq!(std::fs::read(out.join(MANIFEST)).unwrap(), manifest, "cut {cut}");
        Dataset::open(&out).unwrap().verify().unwrap();
        no_leftovers(dir.path());
    }
}

/// The same on a real full disk: BIFLOW_SMALL_FS names a folder on a small filesystem (64 KiB is enough);
/// skipped when unset.
#[test]
fn a_real_full_disk_during_prepare_keeps_the_previous_dataset() {
    let Some(root) = std::env::var_os("BIFLOW_SMALL_FS") else {
        eprintln!("skipped: set BIFLOW_SMALL_FS to a folder on a small filesystem");
        return;
    };
    let images = tempfile::tempdir().unwrap();
    synth_pngs(images.path(), 300, 16, 0, 1).unwrap();
    let dir = tempfile::tempdir_in(root).unwrap();
    let out = dir.path().join("ds");
    prep(&fixture("folder-flat"), &out, serde_json::json!({})).unwrap();
    let manifest = std::fs::read(out.join(MANIFEST)).unwrap();
    let err = format!("{:#}", prep(images.path(), &out, serde_json::json!({"force": true})).unwrap_err());
    assert!(err.contains("No space left") && err.contains(".ds.partial-"), "{err}");
    assert_eq!(std::fs::read(out.join(MANIFEST)).unwrap(), manifest);
    Dataset::open(&out).unwrap().verify().unwrap();
    no_leftovers(dir.path());
}

/// A PNG header claiming a huge image (a decompression bomb of a few bytes) is refused from its header,
/// naming the limit, before any pixel is allocated.
#[test]
fn image_bombs_are_refused_from_the_header() {
    let png = |w: u32, h: u32| {
        let mut ihdr = b"IHDR".to_vec();
        ihdr.extend(w.to_be_bytes());
        ihdr.extend(h.to_be_bytes());
        ihdr.extend([8, 2, 0, 0, 0]);
        let mut crc = flate2::Crc::new();
        crc.update(&ihdr);
        let mut f = b"\x89PNG\r\n\x1a\n".to_vec();
        f.extend(13u32.to_be_bytes());
        f.extend(&ihdr);
        f.extend(crc.sum().to_be_bytes());
        f.extend(b"\x00\x00\x00\x00IEND\xaeB`\x82");
        f
    };
    for (w, h) in [(60000, 60000), (16385, 1), (1, 16385)] {
        let err = format!("{:#}", super::decode::decode_bytes(&png(w, h)).unwrap_err());
        assert!(err.contains("16384"), "{w}x{h}: {err}");
    }
}

/// `--vae`: the images' latents (the posterior mean, scaled as training sees them) as float16
/// records, in the input's order with its labels and split; the manifest names the VAE; inspect
/// decodes its grid; commands that need pixels refuse the dataset; sizes the VAE cannot take and a
/// missing --size are refused before anything is written.
#[test]
fn prepare_with_a_vae_stores_training_latents() {
    let tmp = tempfile::tempdir().unwrap();
    let vae_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/vae/tiny-random");
    let vae = vae_dir.to_str().unwrap();
    let out = tmp.path().join("lat");
    let r = prep(&fixture("folder-labelled"), &out, serde_json::json!({"size": 8, "vae": vae, "valFraction": 0.25, "vaeBatchSize": 2})).unwrap();
    assert_eq!((r["channels"].as_u64(), r["height"].as_u64()), (Some(4), Some(4)), "{r}");
    let ds = Dataset::open(&out).unwrap();
    let latent = ds.manifest.latent.clone().unwrap();
    assert_eq!((latent.image_shape, latent.scaling_factor, latent.posterior.as_str()), ([3, 8, 8], 0.18215, "mean"));
    ds.verify().unwrap();
    // The same images prepared as pixels, encoded here: the records hold their latents.
    let px = tmp.path().join("px");
    prep(&fixture("folder-labelled"), &px, serde_json::json!({"size": 8, "channels": 3, "valFraction": 0.25})).unwrap();
    let pixels = Dataset::open(&px).unwrap();
    assert_eq!(pixels.manifest.splits.val.count, ds.manifest.splits.val.count);
    let n = pixels.len(Split::Train);
    let (x, y) = pixels.batch_f32(Split::Train, &(0..n).collect::<Vec<_>>()).unwrap();
    let model = crate::models::vae::Vae::load(&vae_dir, &candle_core::Device::Cpu).unwrap();
    let want = model.latents(&candle_core::Tensor::from_vec(x, (n, 3, 8, 8), &candle_core::Device::Cpu).unwrap(), None).unwrap();
    let (got, labels) = ds.batch_f32(Split::Train, &(0..n).collect::<Vec<_>>()).unwrap();
    assert_eq!(labels, y);
    let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(got.iter().zip(&want).all(|(a, b)| (a - b).abs() <= 1e-3 * b.abs().max(1.0)), "the records are not the images' latents");
    // --flip: each image then its mirror, both in the image's split.
    let flipped = tmp.path().join("flipped");
    prep(&fixture("folder-labelled"), &flipped, serde_json::json!({"size": 8, "vae": vae, "valFraction": 0.25, "flip": true})).unwrap();
    let f = Dataset::open(&flipped).unwrap();
    assert_eq!((f.manifest.count, f.manifest.splits.val.count), (2 * ds.manifest.count, 2 * ds.manifest.splits.val.count));
    assert!(f.manifest.latent.as_ref().unwrap().flipped);
    let first = pixels.record_index(Split::Train, 0).unwrap();
    let image = candle_core::Tensor::from_vec(pixels.record(first).0.iter().map(|&p| p as f32 / 127.5 - 1.0).collect::<Vec<_>>(), (1, 3, 8, 8), &candle_core::Device::Cpu).unwrap();
    let mirror = model.latents(&image.flip(&[3]).unwrap(), None).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let stored: Vec<f32> = f16_values(f.record(2 * first + 1).0).collect();
    assert!(stored.iter().zip(&mirror).all(|(a, b)| (a - b).abs() <= 1e-3 * b.abs().max(1.0)), "record 2r+1 is not the mirror's latents");
    let grid = crate::jobs::run("data.inspect", serde_json::json!({"dir": out.to_str().unwrap()}), &crate::JobCtx::silent()).unwrap();
    let png = image::open(grid["grid"].as_str().unwrap()).unwrap();
    assert_eq!(png.color().channel_count(), 3);
    // Training reads the latents, which name their VAE; FID reads the VAE's decoded images.
    let data = crate::train::open_data(&out).unwrap();
    assert_eq!((data.shape(), data.latent()), ((4, 4, 4), ds.manifest.latent.as_ref()));
    let mut source = crate::eval::fid::dataset_source(&out, None).unwrap();
    let decoded = source.next_batch(2).unwrap().unwrap();
    assert_eq!((decoded.len(), decoded[0].h, decoded[0].w), (2, 8, 8));
    for (extra, says) in [(serde_json::json!({"size": 9, "vae": vae}), "multiple of the VAE's downsampling 2"), (serde_json::json!({"vae": vae}), "--vae needs --size")] {
        let bad = tmp.path().join("bad");
        let e = format!("{:#}", prep(&fixture("folder-labelled"), &bad, extra).unwrap_err());
        assert!(e.contains(says), "{e}");
        assert!(!bad.exists());
    }
    no_leftovers(tmp.path());
}

/// A latent prepare stopped (Ctrl-C) after its first parts continues where it stopped, with the
/// same command, to the dataset an uninterrupted prepare makes; with other options it starts over.
#[test]
fn an_interrupted_latent_prepare_continues_to_the_same_dataset() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let tmp = tempfile::tempdir().unwrap();
    let vae = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/vae/tiny-random");
    // Forty 8x8 RGB images with labels.
    let npz = tmp.path().join("images.npz");
    let px: Vec<u8> = (0..40 * 8 * 8 * 3).map(|i| ((i * 37 + i / 7) % 256) as u8).collect();
    let labels: Vec<i64> = (0..40).map(|i| i % 3).collect();
    crate::io::npy::write_npz(&npz, &[("data", &crate::io::npy::Array::from_u8(vec![40, 8, 8, 3], px).unwrap()), ("labels", &crate::io::npy::Array::from_i64(vec![40], &labels).unwrap())]).unwrap();
    let options = |out: &Path, seed: u64| {
        serde_json::json!({"input": npz, "out": out, "limit": 40, "size": 8, "vae": vae, "vaeBatchSize": 2, "valFraction": 0.2, "seed": seed, "flip": true})
    };
    let whole = tmp.path().join("whole");
    crate::jobs::run("data.prepare", options(&whole, 1), &crate::JobCtx::silent()).unwrap();
    // A context that stops the encoding once 10 images are done (a part holds 8 here), and keeps the messages.
    let stopping = |messages: Arc<Mutex<Vec<String>>>| {
        let cancel = Arc::new(AtomicBool::new(false));
        let c = cancel.clone();
        crate::JobCtx::new(
            move |e| match e {
                crate::job::Event::Progress { phase, done, .. } if phase == "encode" && done >= 10 => c.store(true, Ordering::SeqCst),
                crate::job::Event::Message { text } => messages.lock().unwrap().push(text),
                _ => {}
            },
            cancel,
        )
    };
    let cut = tmp.path().join("cut");
    let messages = Arc::new(Mutex::new(Vec::new()));
    assert!(crate::jobs::run("data.prepare", options(&cut, 1), &stopping(messages.clone())).unwrap_err().is::<crate::job::Cancelled>());
    let staging = tmp.path().join(".cut.latent-partial");
    assert!(!cut.exists() && staging.join("parts/part-000000.bin").is_file(), "the encoded part is kept");
    assert!(messages.lock().unwrap().iter().any(|m| m.contains("the same command continues it")));
    // The same command continues (images staged, parts kept) and makes the same dataset.
    let heard = Arc::new(Mutex::new(Vec::new()));
    let h = heard.clone();
    let listening = crate::JobCtx::new(move |e| if let crate::job::Event::Message { text } = e { h.lock().unwrap().push(text) }, Arc::new(AtomicBool::new(false)));
    crate::jobs::run("data.prepare", options(&cut, 1), &listening).unwrap();
    assert!(heard.lock().unwrap().iter().any(|m| m.contains("8 of 40 images are encoded")), "{:?}", heard.lock().unwrap());
    let checksum = |d: &Path| Dataset::open(d).unwrap().manifest.checksum.value;
    assert_eq!(checksum(&cut), checksum(&whole), "the continued prepare differs from the uninterrupted one");
    Dataset::open(&cut).unwrap().verify().unwrap();
    assert!(!cut.join("parts").exists() && !cut.join("images").exists() && !cut.join("resume.json").exists());
    // Stopped again, then started with another seed: the interrupted work is not reused.
    let other = tmp.path().join("other");
    assert!(crate::jobs::run("data.prepare", options(&other, 1), &stopping(Arc::new(Mutex::new(Vec::new())))).is_err());
    let heard = Arc::new(Mutex::new(Vec::new()));
    let h = heard.clone();
    let listening = crate::JobCtx::new(move |e| if let crate::job::Event::Message { text } = e { h.lock().unwrap().push(text) }, Arc::new(AtomicBool::new(false)));
    crate::jobs::run("data.prepare", options(&other, 2), &listening).unwrap();
    assert!(heard.lock().unwrap().iter().any(|m| m.contains("starting over")));
    assert_ne!(checksum(&other), checksum(&whole));
    no_leftovers(tmp.path());
}
