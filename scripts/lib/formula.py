"""The fixtures' formula stream, as crates/biflow-core/src/io/formula.rs computes it: FNV-1a of
salt + name seeds splitmix64; each value u in [0, 1) is the top 53 bits / 2^53."""
import numpy as np

M64 = (1 << 64) - 1


def uniform(salt: bytes, name: str, n: int) -> np.ndarray:
    h = 0xCBF29CE484222325
    for b in salt + name.encode():
        h = ((h ^ b) * 0x100000001B3) & M64
    k = np.arange(1, n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(h) + k * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53
