//! File formats shared by every part of biflow.

pub mod atomic;
pub mod formula;
pub mod image;
pub mod npy;
pub mod pickle;
pub mod tensors;

/// The SHA-256 of `bytes` as lowercase hex (checkpoint files, a distilled run's forward weights).
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}
