//! Deterministic stand-in values for parity fixtures: a hash of `salt` and a tensor's name seeds a
//! splitmix64 stream, whose top 53 bits give u in [0, 1). Python reproduces it exactly with numpy's
//! uint64 arithmetic (scripts/bench-fid-pytorch.py, scripts/make-lpips-fixtures.py), so a reference
//! package and biflow can run the same network without shipping its weights.

/// The `numel` values u in [0, 1) of the tensor `name` under `salt`.
pub fn uniform(salt: &str, name: &str, numel: usize) -> impl Iterator<Item = f64> {
    let mut seed: u64 = 0xcbf29ce484222325;
    for b in salt.bytes().chain(name.bytes()) {
        seed = (seed ^ b as u64).wrapping_mul(0x100000001b3);
    }
    (0..numel).map(move |i| {
        let k = i as u64 + 1;
        let mut z = seed.wrapping_add(k.wrapping_mul(0x9E3779B97F4A7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^= z >> 31;
        (z >> 11) as f64 * (2f64).powi(-53)
    })
}
