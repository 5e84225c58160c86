"""Parity fixtures for biflow's ConvNeXt-V2 features (crates/biflow-core/src/models/convnext.rs) against
transformers' ConvNextV2Model in PyTorch.

A small random ConvNeXt-V2 (4 stages, widths 8-32, depths 1,1,2,1) is saved in the layout of the
hub's `facebook/convnextv2-*` checkpoints (config.json + model.safetensors of a
ConvNextV2ForImageClassification: tensors under `convnextv2.`, plus `classifier.`), every tensor
drawn at random so that the GRN and LayerNorm parameters are not their identity values. For image
batches at 32 and 64 px the script records the pooled features (the final stage, averaged over space,
through the last LayerNorm: `pooler_output`), and the gradient of sum(features * r) with respect to the
pixels for a random r. The reference runs in float64. Written: fixtures/convnext/tiny-random/ and
fixtures/convnext/parity.safetensors.

    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install torch transformers numpy safetensors
    /tmp/venv/bin/python scripts/make-convnext-fixtures.py
"""
import os

import numpy as np
import torch
from safetensors.numpy import save_file
from transformers import ConvNextV2Config, ConvNextV2ForImageClassification

CASES = [("rgb32", 2, 32), ("rgb64", 1, 64)]


def main():
    root = os.path.join(os.path.dirname(__file__), "..", "fixtures", "convnext")
    model_dir = os.path.join(root, "tiny-random")
    torch.manual_seed(0)
    config = ConvNextV2Config(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 2, 1], num_labels=5, image_size=64)
    model = ConvNextV2ForImageClassification(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1 and "grn" not in name:
                fan_in = p[0].numel()
                p.copy_(torch.randn_like(p) / np.sqrt(fan_in))
            elif name.endswith("weight") and "grn" not in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    model.save_pretrained(model_dir, safe_serialization=True)
    out = {}
    net = model.convnextv2.to(torch.float64)
    for case, n, size in CASES:
        x = torch.randn(n, 3, size, size, dtype=torch.float64, requires_grad=True)
        pooled = net(pixel_values=x).pooler_output
        r = torch.randn_like(pooled)
        (pooled * r).sum().backward()
        out[f"{case}.x"] = x.detach().numpy().astype(np.float32)
        out[f"{case}.r"] = r.numpy().astype(np.float32)
        out[f"{case}.pooled"] = pooled.detach().numpy().astype(np.float32)
        out[f"{case}.grad"] = x.grad.numpy().astype(np.float32)
        print(case, pooled.shape, float(pooled.abs().max()), float(x.grad.abs().max()))
    save_file(out, os.path.join(root, "parity.safetensors"))


if __name__ == "__main__":
    main()
