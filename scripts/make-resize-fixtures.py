"""Parity fixtures for the crop-and-resize of biflow's perceptual terms (crates/biflow-core/src/models/perceptual.rs):
torchvision's RandomResizedCrop applies `F.resized_crop(img, top, left, height, width, size, BICUBIC,
antialias=True)`, which is a crop and torch's `interpolate(mode="bicubic", antialias=True,
align_corners=False)`. For a few boxes (enlarging, shrinking, both) the script records the input, the
box and the output. Written: fixtures/perceptual/resize.safetensors.

    /tmp/venv/bin/python scripts/make-resize-fixtures.py   (torch, numpy, safetensors)
"""
import os

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import save_file

# name, image side, (top, left, height, width), output side
CASES = [("enlarge", 28, (3, 5, 17, 13), 40), ("shrink", 48, (0, 0, 48, 48), 20), ("both", 40, (2, 10, 30, 12), 20)]


def main():
    root = os.path.join(os.path.dirname(__file__), "..", "fixtures", "perceptual")
    os.makedirs(root, exist_ok=True)
    torch.manual_seed(0)
    out = {}
    for name, side, (top, left, h, w), size in CASES:
        x = torch.rand(1, 3, side, side, dtype=torch.float64) * 2 - 1
        y = F.interpolate(x[:, :, top:top + h, left:left + w], size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        out[f"{name}.x"] = x.numpy().astype(np.float32)
        out[f"{name}.box"] = np.array([top, left, h, w, size], dtype=np.float32)
        out[f"{name}.y"] = y.numpy().astype(np.float32)
    save_file(out, os.path.join(root, "resize.safetensors"))


if __name__ == "__main__":
    main()
