"""Side-by-side baseline: one BiFlow distillation step (DESIGN.md 2.2) in PyTorch on CPU: a frozen
TARFlow F (the model of torch_tarflow_train_bench.py, with class embeddings) gives the trajectory
x^1..x^B of x~ = x + sigma*eps; the reverse model G (a bidirectional transformer with a head per
stage and a learned-denoising block) is trained with hidden alignment, reconstruction of the clean x
and training-time guidance. Written from the paper and DESIGN.md; not part of the test suite.

    python -m venv /tmp/venv-torch && /tmp/venv-torch/bin/pip install torch
    /tmp/venv-torch/bin/python scripts/reference/torch_biflow_distill_bench.py [--config tiny|paper] [--threads 2]

One step: x~ = x + sigma*eps; F forward under no_grad (trajectory, canonical token order); G on
(z = x^B, y, w) with gradient, G on (z, null, w) without (stop-gradient of the unconditional branch);
every output O (the B heads and x') is combined as O_cond = (O(y,w) + w sg(O(null,w))) / (1 + w);
loss = batch mean of sum_terms D / sg(D + 0.01), with D_j = MSE(O_cond_j, n(x^{B-j})) (n: unit RMS per
sample) and D_rec = MSE(x'_cond, x); backward; grad clip 1.0; AdamW (0.9, 0.95), weight decay 1e-4.
Prints one JSON object: steps/s (mean of the timed steps after a warm-up).

`--perceptual-size S` adds the perceptual terms of biflow's `distill --lpips --convnext` (paper §4):
x'_cond and x as images, each pair given one torchvision RandomResizedCrop (area U(0.08, 1), aspect
3/4-4/3, bicubic with antialias) to S px, gray repeated to RGB; LPIPS (the lpips package, VGG with
random backbone weights and its real v0.1 heads) weighted 0.4 and the squared L2 distance of
ConvNeXt-V2 Base pooled features (transformers, random weights, ImageNet normalisation) weighted 0.1,
each adaptively weighted as the other terms. Needs `pip install lpips transformers` as well.
"""
import argparse
import json
import math
import os
import resource
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_tarflow_train_bench import Layer, TarFlow, class_rows  # noqa: E402

CONFIGS = {
    # F: 32x32x1, patch 4 (T = 64, D = 16), 256 channels, 4 blocks x 2 layers; G: 4 stages x 1 + 1 denoise.
    "tiny": dict(img=32, ch=1, patch=4, c=256, blocks=4, layers=2, g_layers=1, denoise=1, batch=64),
    # F: 64x64x4, patch 4 (T = 256, D = 64), 512 channels, 8 blocks x 1 layer; G: 8 stages x 1 + 1 denoise.
    "paper": dict(img=64, ch=4, patch=4, c=512, blocks=8, layers=1, g_layers=1, denoise=1, batch=16),
    # The demo's F (biflow demo, full): 28x28x1, patch 4 (T = 49, D = 16), 128 channels, 4 blocks x 1 layer.
    "demo": dict(img=28, ch=1, patch=4, c=128, blocks=4, layers=1, g_layers=1, denoise=1, batch=64),
}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Perceptual:
    """LPIPS (0.4) and ConvNeXt-V2 Base features (0.1) on paired random resized crops to `size`."""

    def __init__(self, size, img, patch):
        import lpips
        from transformers import ConvNextV2Config, ConvNextV2Model

        self.size, self.img, self.patch = size, img, patch
        self.lpips = lpips.LPIPS(net="vgg", version="0.1", pretrained=True, pnet_rand=True, verbose=False).eval().requires_grad_(False)
        base = ConvNextV2Config(hidden_sizes=[128, 256, 512, 1024], depths=[3, 3, 27, 3])
        self.convnext = ConvNextV2Model(base).eval().requires_grad_(False)
        self.mean = torch.tensor(IMAGENET_MEAN)[None, :, None, None]
        self.std = torch.tensor(IMAGENET_STD)[None, :, None, None]

    def crops(self, pred, target):
        outs = ([], [])
        for i in range(pred.shape[0]):
            top, left, h, w = random_resized_crop_box(self.img)
            for out, x in zip(outs, (pred, target)):
                box = x[i : i + 1, :, top : top + h, left : left + w]
                out.append(torch.nn.functional.interpolate(box, size=(self.size, self.size), mode="bicubic", antialias=True, align_corners=False))
        return torch.cat(outs[0]), torch.cat(outs[1])

    def terms(self, pred_tokens, target_tokens):
        image = lambda t: torch.nn.functional.fold(t.transpose(1, 2), (self.img, self.img), self.patch, stride=self.patch)
        x0, x1 = self.crops(image(pred_tokens), image(target_tokens))
        x0, x1 = x0.repeat(1, 3, 1, 1), x1.repeat(1, 3, 1, 1)
        d_lpips = self.lpips(x0, x1).reshape(-1)
        feats = lambda x: self.convnext(pixel_values=((x + 1) / 2 - self.mean) / self.std).pooler_output
        d_convnext = (feats(x0) - feats(x1)).pow(2).sum(1)
        return [(0.4, d_lpips), (0.1, d_convnext)]


def random_resized_crop_box(side, area=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params for a square image."""
    for _ in range(10):
        target = side * side * torch.empty(1).uniform_(*area).item()
        aspect = math.exp(torch.empty(1).uniform_(math.log(ratio[0]), math.log(ratio[1])).item())
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= side and 0 < h <= side:
            return int(torch.randint(0, side - h + 1, (1,))), int(torch.randint(0, side - w + 1, (1,))), h, w
    return 0, 0, side, side
GUIDANCE_FEATURES = 8  # f(w) = [sin(k pi s), cos(k pi s)], k = 1..8, s = w / (1 + w)


class ReverseModel(nn.Module):
    """G: proj_in(z) + pos + class + cfg_embed(f(w)); B stages, each followed by a head
    (LayerNorm -> Linear(C, D)) predicting the forward state it mirrors; denoise layers; x'."""

    def __init__(self, d, t, c, stages, layers_per_stage, denoise_layers, classes):
        super().__init__()
        self.proj_in = nn.Linear(d, c)
        self.pos = nn.Parameter(torch.randn(t, c) * 1e-2)
        self.class_embed = nn.Parameter(torch.randn(classes, c) * 1e-2)
        self.cfg_embed = nn.Linear(2 * GUIDANCE_FEATURES, c)
        self.stages = nn.ModuleList(nn.ModuleList(Layer(c) for _ in range(layers_per_stage)) for _ in range(stages))
        self.head_norms = nn.ModuleList(nn.LayerNorm(c) for _ in range(stages))
        self.heads = nn.ModuleList(nn.Linear(c, d) for _ in range(stages))
        self.denoise = nn.ModuleList(Layer(c) for _ in range(denoise_layers))
        self.norm_out = nn.LayerNorm(c)
        self.proj_out = nn.Linear(c, d)

    def forward(self, z, y, w):
        s = (w / (1 + w))[:, None]
        k = torch.arange(1, GUIDANCE_FEATURES + 1, dtype=z.dtype)
        feats = torch.cat([torch.sin(k * math.pi * s), torch.cos(k * math.pi * s)], -1)
        h = self.proj_in(z) + self.pos + (class_rows(self.class_embed, y) + self.cfg_embed(feats))[:, None]
        preds = []
        for stage, norm, head in zip(self.stages, self.head_norms, self.heads):
            for layer in stage:
                h = layer(h)  # no mask: bidirectional
            preds.append(head(norm(h)))
        for layer in self.denoise:
            h = layer(h)
        return preds + [self.proj_out(self.norm_out(h))]


def unit_rms(v):
    return v / (v.pow(2).mean(dim=(1, 2), keepdim=True) + 1e-6).sqrt()


def adaptive(d, eps=0.01, p=1.0):
    return d / (d + eps).pow(p).detach()


def distill_step(f, g, opt, x, y, sigma, perceptual=None, cfg_range=(0.0, 3.0), label_drop=0.1):
    n = x.shape[0]
    y = torch.where(torch.rand(n) < label_drop, torch.full_like(y, -1), y)  # -1: the mean class embedding
    lo, hi = cfg_range
    w = lo + (hi - lo) * torch.rand(n).pow(3)
    with torch.no_grad():
        x0 = f.patchify(x + sigma * torch.randn_like(x))  # x~ = x^0, tokens
        traj, _ = f.trajectory(x0, y)  # x^1 .. x^B, under the same (possibly dropped) labels
    z = traj[-1]
    outs = g(z, y, w)
    with torch.no_grad():
        outs_null = g(z, torch.full_like(y, -1), w)
    wb = w[:, None, None]
    cond = [(o + wb * o_null) / (1 + wb) for o, o_null in zip(outs, outs_null)]
    # Stage j mirrors x^{B-j}: x^{B-1}, ..., x^1, x^0 = x~ (normalised); x' reconstructs the clean x.
    targets = [unit_rms(v) for v in reversed([x0] + traj[:-1])] + [f.patchify(x)]
    per_sample = sum(adaptive((o - t).pow(2).mean(dim=(1, 2))) for o, t in zip(cond, targets))
    if perceptual is not None:
        per_sample = per_sample + sum(weight * adaptive(d) for weight, d in perceptual.terms(cond[-1], targets[-1]))
    loss = per_sample.mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(g.parameters(), 1.0)
    opt.step()
    return loss.item()


def bench(name, steps, warmup, batch=None, perceptual_size=0, classes=10, sigma=0.05):
    k = dict(CONFIGS[name])
    if batch:
        k["batch"] = batch
    torch.manual_seed(0)
    f = TarFlow(k["img"], k["ch"], k["patch"], k["c"], k["blocks"], k["layers"], classes).eval()
    with torch.no_grad():
        for block in f.blocks:  # a forward model that is not the identity
            block.proj_out.weight.normal_(0.0, 0.01)
    f.requires_grad_(False)
    t, d = (k["img"] // k["patch"]) ** 2, k["ch"] * k["patch"] ** 2
    g = ReverseModel(d, t, k["c"], k["blocks"], k["g_layers"], k["denoise"], classes)
    opt = torch.optim.AdamW(g.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=1e-4)
    perceptual = Perceptual(perceptual_size, k["img"], k["patch"]) if perceptual_size else None
    batch = k["batch"]
    x = torch.rand(batch, k["ch"], k["img"], k["img"]) * 2 - 1
    y = torch.arange(batch) % classes
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        loss = distill_step(f, g, opt, x, y, sigma, perceptual)
    secs = time.perf_counter() - start
    return {
        "config": name,
        "what": "biflow distill step",
        "batch": batch,
        "perceptualSize": perceptual_size,
        "steps": steps,
        "stepsPerSec": steps / secs,
        "imagesPerSec": steps * batch / secs,
        "loss": loss,
        "gParams": sum(p.numel() for p in g.parameters()),
        "peakRssMiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--perceptual-size", type=int, default=0, help="add LPIPS and ConvNeXt-V2 terms on crops resized to this side (0: none)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(), **bench(args.config, args.steps, args.warmup, args.batch, args.perceptual_size)}
    print(json.dumps(out))
