"""Parity fixtures for biflow's LPIPS (crates/biflow-core/src/models/lpips.rs) against the `lpips`
package 0.1.4 (net='vgg', version 0.1) in PyTorch.

The VGG16 backbone is not shipped: its weights come from the formula of crates/biflow-core/src/io/formula.rs
(salt "biflow-lpips-fixture/", He-uniform convolutions), which biflow reproduces bit for bit. The linear
heads are the real ones, the package's own weights/v0.1/vgg.pth, copied to fixtures/lpips/vgg-lin-v0.1.pth.
The image pairs come from the same formula. The reference runs in float64 (PyTorch's own float32
gradient at 224 px is 1.1e-3 away from it in relative L2 norm, and single values up to 1.6% of the
largest: near-equal maxima in the 2x2 max-pools route a pixel's gradient either way). Written:
fixtures/lpips/parity.safetensors with, per case, the distances d (N), the gradient of sum(d) with
respect to the first image (in full at 32 and 64 px; at 224 px every 101st value and the gradient's
sum of squares, to keep the fixture small), and how far PyTorch's float32 gradient is from it
(`torch_f32_rel_l2`).

    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install torch lpips==0.1.4 numpy safetensors
    /tmp/venv/bin/python scripts/make-lpips-fixtures.py
"""
import os, shutil, sys

import lpips
import numpy as np
import torch
from safetensors.numpy import save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "lib"))
import formula  # noqa: E402

SALT = b"biflow-lpips-fixture/"
# torchvision's vgg16().features: the convolutions' indices (3x3, padding 1), by stage.
CONVS = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
STRIDE = 101  # the 224 px gradient is kept at every STRIDE-th value
CASES = [("gray32", 2, 1, 32), ("rgb32", 2, 3, 32), ("rgb64", 2, 3, 64), ("rgb224", 1, 3, 224)]


def backbone_tensor(name, shape):
    u = formula.uniform(SALT, name, int(np.prod(shape)))
    if name.endswith(".weight"):
        v = (2 * u - 1) * np.sqrt(6 / (shape[1] * shape[2] * shape[3]))
    else:
        v = 0.02 * (2 * u - 1)
    return torch.from_numpy(v.astype(np.float32).reshape(shape))


def image(name, shape):
    return torch.from_numpy((2 * formula.uniform(SALT, name, int(np.prod(shape))) - 1).astype(np.float32).reshape(shape))


def main():
    root = os.path.join(os.path.dirname(__file__), "..", "fixtures", "lpips")
    os.makedirs(root, exist_ok=True)
    heads = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth")
    shutil.copyfile(heads, os.path.join(root, "vgg-lin-v0.1.pth"))
    torch.manual_seed(0)
    model = lpips.LPIPS(net="vgg", version="0.1", pretrained=True, pnet_rand=True, verbose=False).eval()
    sd = model.state_dict()
    for i in CONVS:
        stage = 1 + sum(i >= s for s in (4, 9, 16, 23))
        for part in ("weight", "bias"):
            key = f"net.slice{stage}.{i}.{part}"
            sd[key] = backbone_tensor(f"features.{i}.{part}", tuple(sd[key].shape))
    model.load_state_dict(sd)
    out = {}
    for case, n, c, size in CASES:
        grads = {}
        for dtype in (torch.float32, torch.float64):
            model = model.to(dtype)
            x0 = image(f"{case}/x0", (n, c, size, size)).to(dtype).requires_grad_(True)
            x1 = image(f"{case}/x1", (n, c, size, size)).to(dtype)
            rep = lambda x: x.repeat(1, 3, 1, 1) if c == 1 else x
            d = model(rep(x0), rep(x1)).reshape(n)
            d.sum().backward()
            grads[dtype] = x0.grad.numpy().reshape(-1)
        g, g32 = grads[torch.float64], grads[torch.float32]
        out[f"{case}.torch_f32_rel_l2"] = np.array([np.linalg.norm(g32 - g) / np.linalg.norm(g)], dtype=np.float32)
        out[f"{case}.d"] = d.detach().numpy().astype(np.float32)
        if size >= 224:
            out[f"{case}.grad_strided"] = g[::STRIDE].astype(np.float32).copy()
            out[f"{case}.grad_sumsq"] = np.array([np.sum(g.astype(np.float64) ** 2)], dtype=np.float32)
        else:
            out[f"{case}.grad"] = g.astype(np.float32).reshape(n, c, size, size)
        print(case, d.detach().numpy(), "torch float32 gradient vs float64, relative L2:", out[f"{case}.torch_f32_rel_l2"][0])
    save_file(out, os.path.join(root, "parity.safetensors"))


if __name__ == "__main__":
    main()
