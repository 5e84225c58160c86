//! Writer/reader round trips, checksums, splits, bounded memory, and every decoder on tiny inputs.

use std::path::Path;

use super::prepare::{choose_val, write_manifest};
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
    };
    write_manifest(dir, &m).unwrap();
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
