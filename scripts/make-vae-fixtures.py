"""Parity fixtures for biflow's VAE (crates/biflow-core/src/models/vae.rs) against diffusers' AutoencoderKL
(0.42, float64 reference).

A small random AutoencoderKL (widths 8 and 16, one resnet per block, 4 groups, 4 latent channels, mid-block
attention, scaling factor 0.18215) is saved in the diffusers layout (config.json +
diffusion_pytorch_model.safetensors), every tensor drawn at random so that norms and biases are not their
identity values. For a 2x3x16x16 image batch the script records the encoder's mean and log-variance, the
decoder's output for the mean, and the gradient of sum(decoded * r) with respect to the latents for a
random r. Written: fixtures/vae/tiny-random/ and fixtures/vae/parity.safetensors.

`--full DIR` instead writes the full SD-VAE configuration (stabilityai/sd-vae-ft-ema's shapes: widths
128-512, 2 resnets per block, 32 groups; random weights, 335 MB) to DIR with the same four references for
one 256 px image; `BIFLOW_VAE_FULL=DIR cargo test --release -p biflow-core -- --ignored full_sd_vae` then
compares (not a CI fixture: too large).

    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install torch diffusers==0.42.0 numpy safetensors
    /tmp/venv/bin/python scripts/make-vae-fixtures.py [--full DIR]
"""
import argparse
import os

import numpy as np
import torch
from diffusers import AutoencoderKL
from safetensors.numpy import save_file


def randomise(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn_like(p) / np.sqrt(p[0].numel()))
            elif name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))


def autoencoder(widths, layers_per_block, groups, sample_size):
    """An AutoencoderKL of the SD family: one encoder/decoder block per width, 4 latent channels."""
    return AutoencoderKL(
        block_out_channels=widths,
        down_block_types=("DownEncoderBlock2D",) * len(widths),
        up_block_types=("UpDecoderBlock2D",) * len(widths),
        layers_per_block=layers_per_block,
        norm_num_groups=groups,
        latent_channels=4,
        sample_size=sample_size,
    ).eval()


def references(model, x):
    """Mean, log-variance, the decoded mean and the decoder's latent gradient, in float64."""
    model = model.to(torch.float64)
    posterior = model.encode(x).latent_dist
    z = posterior.mean.detach().clone().requires_grad_(True)
    decoded = model.decode(z).sample
    r = torch.randn_like(decoded)
    (decoded * r).sum().backward()
    arrays = {"x": x, "mean": posterior.mean, "logvar": posterior.logvar, "decoded": decoded, "r": r, "grad": z.grad}
    return {k: v.detach().numpy().astype(np.float32).copy(order="C") for k, v in arrays.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", help="write the full SD-VAE check to this folder instead of the CI fixture")
    args = ap.parse_args()
    if args.full:
        model = autoencoder((128, 256, 512, 512), layers_per_block=2, groups=32, sample_size=256)
        root, model_dir, side, n = args.full, os.path.join(args.full, "vae"), 256, 1
    else:
        model = autoencoder((8, 16), layers_per_block=1, groups=4, sample_size=16)
        root = os.path.join(os.path.dirname(__file__), "..", "fixtures", "vae")
        model_dir, side, n = os.path.join(root, "tiny-random"), 16, 2
    randomise(model)
    model.save_pretrained(model_dir, safe_serialization=True)
    torch.manual_seed(1)
    x = torch.rand(n, 3, side, side, dtype=torch.float64) * 2 - 1
    out = references(model, x)
    save_file(out, os.path.join(root, "parity.safetensors"))
    print({k: (v.shape, float(np.abs(v).max())) for k, v in out.items()})


if __name__ == "__main__":
    main()
