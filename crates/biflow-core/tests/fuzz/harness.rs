//! The mutation harness shared by every reader's fuzz test: seeded mutations of valid inputs, each case
//! run under `catch_unwind`, with a panic hook and an allocation guard watching for what `catch_unwind`
//! cannot see (panics in reader threads, absurd allocations).

use std::alloc::{GlobalAlloc, Layout, System};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub type Rand = ChaCha8Rng;

/// No single allocation may exceed this: a reader must refuse an absurd size before allocating it.
pub const ALLOC_LIMIT: usize = 1 << 30;
/// A case running longer than this is reported as a hang.
const HANG: Duration = Duration::from_secs(10);
/// Inputs never grow past this (a mutation that would is cut short).
pub const MAX_INPUT: usize = 4 << 20;

struct Guard;

/// The size of the last allocation refused by the guard (0: none).
static REFUSED: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Guard {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if l.size() > ALLOC_LIMIT {
            REFUSED.store(l.size(), Ordering::SeqCst);
            return std::ptr::null_mut();
        }
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if l.size() > ALLOC_LIMIT {
            REFUSED.store(l.size(), Ordering::SeqCst);
            return std::ptr::null_mut();
        }
        System.alloc_zeroed(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if new > ALLOC_LIMIT {
            REFUSED.store(new, Ordering::SeqCst);
            return std::ptr::null_mut();
        }
        System.realloc(p, l, new)
    }
}

#[global_allocator]
static GLOBAL: Guard = Guard;

/// Panics seen by the hook (any thread) and the last message.
static PANICS: AtomicU64 = AtomicU64::new(0);
static LAST_PANIC: Mutex<String> = Mutex::new(String::new());
static HOOK: Once = Once::new();
thread_local! {
    /// This thread is running a case.
    static IN_CASE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn install_hook() {
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            // A panic in a case, or in a thread a case started (a reader thread), counts against the running
            // cases; the tests' own panics (their assertions) print as usual.
            let t = std::thread::current();
            let helper = !t.name().is_some_and(|n| n.starts_with("fuzz_"));
            if IN_CASE.with(|c| c.get()) || helper {
                PANICS.fetch_add(1, Ordering::SeqCst);
                if let Ok(mut m) = LAST_PANIC.lock() {
                    *m = format!("thread '{}' panicked: {info}", t.name().unwrap_or("?"));
                }
            } else {
                default(info);
            }
        }));
    });
}

/// The base seed: BIFLOW_FUZZ_SEED or a fixed one.
pub fn base_seed() -> u64 {
    std::env::var("BIFLOW_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x00b1_f10e)
}

/// Long mode: BIFLOW_FUZZ_SECONDS per reader.
fn long_mode() -> Option<Duration> {
    std::env::var("BIFLOW_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .map(Duration::from_secs_f64)
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The regression inputs kept for `reader` (fixtures/fuzz/<reader>/*), sorted by name.
fn regressions(reader: &str) -> Vec<(String, Vec<u8>)> {
    let dir = repo_root().join("fixtures/fuzz").join(reader);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.path().is_file() && !e.file_name().to_string_lossy().ends_with(".md"))
                .map(|e| {
                    (
                        e.file_name().to_string_lossy().into_owned(),
                        std::fs::read(e.path()).unwrap(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// What one case did.
enum Outcome {
    Accepted,
    Refused,
    Crashed(String),
}

fn run_case(run: &(dyn Fn(&[u8]) -> anyhow::Result<()> + Sync), input: &[u8]) -> Outcome {
    let panics = PANICS.load(Ordering::SeqCst);
    REFUSED.store(0, Ordering::SeqCst);
    IN_CASE.with(|c| c.set(true));
    let r = catch_unwind(AssertUnwindSafe(|| run(input)));
    IN_CASE.with(|c| c.set(false));
    let refused = REFUSED.swap(0, Ordering::SeqCst);
    if PANICS.load(Ordering::SeqCst) != panics || r.is_err() {
        return Outcome::Crashed(LAST_PANIC.lock().map(|m| m.clone()).unwrap_or_default());
    }
    if refused > 0 {
        return Outcome::Crashed(format!(
            "an allocation of {refused} bytes was attempted (limit {ALLOC_LIMIT})"
        ));
    }
    match r {
        Ok(Ok(())) => Outcome::Accepted,
        _ => Outcome::Refused,
    }
}

/// Fuzz one reader: replay its regression inputs and seeds, then `cases` mutated inputs (or as many as
/// BIFLOW_FUZZ_SECONDS allows). Panics, with the crashing inputs saved under target/fuzz-crashes/, if
/// any case panicked or tried an absurd allocation.
pub fn fuzz(
    reader: &str,
    cases: u64,
    seeds: &[Vec<u8>],
    mutate: impl Fn(&mut Rand, &[Vec<u8>]) -> Vec<u8>,
    run: impl Fn(&[u8]) -> anyhow::Result<()> + Sync,
) {
    install_hook();
    let started = Instant::now();
    let mut crashes: Vec<String> = Vec::new();
    let crash_dir = repo_root().join("target/fuzz-crashes");
    let record = |crashes: &mut Vec<String>, what: &str, input: &[u8], msg: String| {
        let _ = std::fs::create_dir_all(&crash_dir);
        let p = crash_dir.join(format!("{reader}-{what}.bin"));
        let _ = std::fs::write(&p, input);
        crashes.push(format!(
            "{what} ({} bytes, saved to {}): {msg}",
            input.len(),
            p.display()
        ));
    };
    for (name, input) in regressions(reader) {
        if let Outcome::Crashed(msg) = run_case(&run, &input) {
            record(&mut crashes, &format!("regression-{name}"), &input, msg);
        }
    }
    for (i, s) in seeds.iter().enumerate() {
        if let Outcome::Crashed(msg) = run_case(&run, s) {
            record(&mut crashes, &format!("seed-{i}"), s, msg);
        }
    }
    let base = base_seed()
        ^ reader.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
    let limit = long_mode();
    let (mut n, mut accepted, mut refused) = (0u64, 0u64, 0u64);
    // A watchdog names a case that runs for more than HANG seconds and saves its input (a hang is a crash
    // that catch_unwind cannot see).
    let current: Mutex<(u64, Instant, Vec<u8>, bool)> =
        Mutex::new((0, Instant::now(), Vec::new(), false));
    let done = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        // However this scope ends (a mutator may panic), the watchdog stops.
        struct Stop<'a>(&'a AtomicUsize);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(1, Ordering::SeqCst);
            }
        }
        let _stop = Stop(&done);
        scope.spawn(|| {
        while done.load(Ordering::SeqCst) == 0 {
            std::thread::sleep(Duration::from_millis(200));
            let mut c = current.lock().unwrap();
            if !c.3 && c.1.elapsed() > HANG {
                c.3 = true;
                let _ = std::fs::create_dir_all(&crash_dir);
                let p = crash_dir.join(format!("{reader}-hang-{}-{}.bin", base_seed(), c.0));
                let _ = std::fs::write(&p, &c.2);
                eprintln!("fuzz {reader}: case {} has run for over {} s (a hang?); its input is in {}", c.0, HANG.as_secs(), p.display());
            }
        }
    });
        loop {
            match limit {
                Some(d) if started.elapsed() >= d => break,
                None if n >= cases => break,
                _ => {}
            }
            // Each case has its own generator: case n replays alone from (seed, reader, n).
            let mut rng =
                Rand::seed_from_u64(base.wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
            let mut input = mutate(&mut rng, seeds);
            input.truncate(MAX_INPUT);
            *current.lock().unwrap() = (n, Instant::now(), input.clone(), false);
            match run_case(&run, &input) {
                Outcome::Accepted => accepted += 1,
                Outcome::Refused => refused += 1,
                Outcome::Crashed(msg) => record(
                    &mut crashes,
                    &format!("case-{}-{n}", base_seed()),
                    &input,
                    msg,
                ),
            }
            n += 1;
            if crashes.len() >= 10 {
                break;
            }
        }
    });
    eprintln!(
        "fuzz {reader}: {n} cases in {:.1} s ({accepted} accepted, {refused} refused, {} crashed), seed {}",
        started.elapsed().as_secs_f64(),
        crashes.len(),
        base_seed()
    );
    for c in &crashes {
        eprintln!("fuzz {reader}: CRASH {c}");
    }
    assert!(
        crashes.is_empty(),
        "fuzz {reader}: {} crashing inputs:\n{}",
        crashes.len(),
        crashes.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------------------
// Mutations

const INTERESTING_U64: &[u64] = &[
    0,
    1,
    2,
    3,
    7,
    8,
    16,
    127,
    128,
    255,
    256,
    1000,
    1024,
    4096,
    65535,
    65536,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    1 << 40,
    1 << 60,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX,
];

const INTERESTING_DECIMAL: &[&str] = &[
    "0",
    "-1",
    "1",
    "2",
    "3",
    "65536",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "18446744073709551615",
    "18446744073709551616",
    "1e308",
    "-9999999999",
    "1.5",
    "NaN",
    "99999999999999999999999999",
];

pub fn interesting_u64(rng: &mut Rand) -> u64 {
    let v = INTERESTING_U64[rng.gen_range(0..INTERESTING_U64.len())];
    match rng.gen_range(0..4) {
        0 => v.wrapping_add(1),
        1 => v.wrapping_sub(1),
        _ => v,
    }
}

pub fn interesting_decimal(rng: &mut Rand) -> String {
    if rng.gen_bool(0.3) {
        interesting_u64(rng).to_string()
    } else {
        INTERESTING_DECIMAL[rng.gen_range(0..INTERESTING_DECIMAL.len())].to_string()
    }
}

/// Write `v` as `width` bytes (little- or big-endian) at `at`.
pub fn put_int(data: &mut [u8], at: usize, width: usize, v: u64, big_endian: bool) {
    let bytes = if big_endian {
        v.to_be_bytes()[8 - width..].to_vec()
    } else {
        v.to_le_bytes()[..width].to_vec()
    };
    for (i, b) in bytes.into_iter().enumerate() {
        if let Some(d) = data.get_mut(at + i) {
            *d = b;
        }
    }
}

/// One generic mutation of `data` (flip, set, truncate, delete, duplicate, splice, integer, number,
/// repeat, insert), drawing splice material from `others`.
pub fn mutate_once(rng: &mut Rand, data: &mut Vec<u8>, others: &[Vec<u8>]) {
    if data.is_empty() {
        data.extend((0..rng.gen_range(1..16)).map(|_| rng.gen::<u8>()));
        return;
    }
    let len = data.len();
    let at = rng.gen_range(0..len);
    match rng.gen_range(0..11) {
        0 => data[at] ^= 1 << rng.gen_range(0..8),
        1 => {
            data[at] =
                [0u8, 0xff, 0x7f, 0x80, 0x01, b'0', b'9', b'\n', b'"', b'['][rng.gen_range(0..10)]
        }
        2 => data.truncate(at),
        3 => {
            let end = (at + rng.gen_range(1..=64.min(len - at))).min(len);
            data.drain(at..end);
        }
        4 => {
            let end = (at + rng.gen_range(1..=256.min(len - at))).min(len);
            let chunk = data[at..end].to_vec();
            let to = rng.gen_range(0..=data.len());
            data.splice(to..to, chunk);
        }
        5 => {
            if let Some(o) = others
                .get(rng.gen_range(0..others.len().max(1)))
                .filter(|o| !o.is_empty())
            {
                let from = rng.gen_range(0..o.len());
                data.truncate(at);
                data.extend_from_slice(&o[from..]);
            }
        }
        6 => {
            let width = [1, 2, 4, 8][rng.gen_range(0..4)];
            let v = interesting_u64(rng);
            let be = rng.gen_bool(0.5);
            put_int(data, at, width, v, be);
        }
        7 => replace_number(rng, data),
        8 => {
            // Repeat a short chunk many times: nesting, long runs.
            let end = (at + rng.gen_range(1..=8.min(len - at))).min(len);
            let chunk = data[at..end].to_vec();
            let times = [2, 10, 100, 1000, 20000][rng.gen_range(0..5)];
            let rep: Vec<u8> = chunk
                .iter()
                .copied()
                .cycle()
                .take((chunk.len() * times).min(MAX_INPUT / 4))
                .collect();
            data.splice(at..at, rep);
        }
        9 => {
            let n = rng.gen_range(1..16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
            data.splice(at..at, bytes);
        }
        _ => data.swap(at, rng.gen_range(0..len)),
    }
}

/// Replace one run of ASCII digits (a count, a length, a size in a text header) with an interesting number.
pub fn replace_number(rng: &mut Rand, data: &mut Vec<u8>) {
    let runs: Vec<(usize, usize)> = {
        let mut v = Vec::new();
        let mut i = 0;
        while i < data.len() {
            if data[i].is_ascii_digit() {
                let s = i;
                while i < data.len() && data[i].is_ascii_digit() {
                    i += 1;
                }
                v.push((s, i));
            } else {
                i += 1;
            }
        }
        v
    };
    if runs.is_empty() {
        return;
    }
    let (s, e) = runs[rng.gen_range(0..runs.len())];
    let num = interesting_decimal(rng);
    data.splice(s..e, num.into_bytes());
}

/// 1 to 4 generic mutations of a random seed.
pub fn mutate_generic(rng: &mut Rand, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut data = seeds[rng.gen_range(0..seeds.len())].clone();
    for _ in 0..rng.gen_range(1..=4) {
        mutate_once(rng, &mut data, seeds);
    }
    data
}
