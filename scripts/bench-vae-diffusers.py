"""The VAE benchmark of biflow (crates/biflow-core/examples/bench_vae.rs) with diffusers: images/s of
encoding (to the posterior mean) and decoding with AutoencoderKL at the full SD-VAE configuration (random
weights), float32 on the CPU, at a size and batch. Prints one JSON object.

    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install torch diffusers==0.42.0
    /tmp/venv/bin/python scripts/bench-vae-diffusers.py [--size 256] [--batch 8] [--rounds 1] [--threads 2]
"""
import argparse
import json
import resource
import time

import torch
from diffusers import AutoencoderKL


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
    ).eval()
    x = torch.rand(args.batch, 3, args.size, args.size) * 2 - 1

    def timed(f):
        f()  # warm-up
        start = time.perf_counter()
        for _ in range(args.rounds):
            f()
        return (time.perf_counter() - start) / args.rounds

    with torch.no_grad():
        encode = timed(lambda: vae.encode(x).latent_dist.mean)
        z = vae.encode(x).latent_dist.mean
        decode = timed(lambda: vae.decode(z).sample)
    print(json.dumps({
        "what": "vae (diffusers)", "torch": torch.__version__, "threads": torch.get_num_threads(), "size": args.size, "batch": args.batch,
        "encodeSeconds": encode, "decodeSeconds": decode, "encodeImagesPerSecond": args.batch / encode, "decodeImagesPerSecond": args.batch / decode,
        "peakRssMiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


if __name__ == "__main__":
    main()
