"""Side-by-side baseline: a TARFlow training step in PyTorch on CPU, for the same configs as
`npm run bench:train`. Written from the TARFlow/BiFlow papers (DESIGN.md 2.1); not part of the test suite.

    python -m venv /tmp/venv-torch && /tmp/venv-torch/bin/pip install torch
    /tmp/venv-torch/bin/python scripts/reference/torch_tarflow_train_bench.py [--threads 2]
"""
import argparse
import json
import resource
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Attention(nn.Module):
    def __init__(self, c, head_dim=64):
        super().__init__()
        self.heads = c // head_dim
        self.norm = nn.LayerNorm(c)
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)

    def forward(self, x, mask=None):
        n, t, c = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(n, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5
        if mask is not None:
            att = att.masked_fill(~mask, float("-inf"))
        att = att.softmax(-1)
        return self.proj((att @ v).transpose(1, 2).reshape(n, t, c))


class Layer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.attention = Attention(c)
        self.norm = nn.LayerNorm(c)
        self.mlp = nn.Sequential(nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c))

    def forward(self, x, mask=None):
        x = x + self.attention(x, mask)
        return x + self.mlp(self.norm(x))


def class_rows(table, y):
    """Rows of a (K, C) class-embedding table for labels y (N); label -1 takes the mean row."""
    rows = table[y.clamp(min=0)]
    return torch.where((y < 0)[:, None], table.mean(0, keepdim=True), rows)


class FlowBlock(nn.Module):
    def __init__(self, d, t, c, layers, flip, classes=0):
        super().__init__()
        self.flip = flip
        self.proj_in = nn.Linear(d, c)
        self.pos = nn.Parameter(torch.randn(t, c) * 1e-2)
        self.class_embed = nn.Parameter(torch.randn(classes, c) * 1e-2) if classes else None
        self.layers = nn.ModuleList(Layer(c) for _ in range(layers))
        self.proj_out = nn.Linear(c, 2 * d)
        nn.init.zeros_(self.proj_out.weight)
        self.register_buffer("mask", torch.tril(torch.ones(t, t, dtype=torch.bool)))

    def forward(self, x, y=None):
        if self.flip:
            x = x.flip(1)
        h = self.proj_in(x) + self.pos
        if self.class_embed is not None and y is not None:
            h = h + class_rows(self.class_embed, y)[:, None]
        for layer in self.layers:
            h = layer(h, self.mask)
        o = self.proj_out(h)
        o = torch.cat([torch.zeros_like(o[:, :1]), o[:, :-1]], 1)
        a, b = o.chunk(2, -1)
        y = (x - b) * torch.exp(-a)
        if self.flip:
            y = y.flip(1)
        return y, -a.mean(dim=(1, 2))


class TarFlow(nn.Module):
    def __init__(self, img, ch, patch, c, blocks, layers, classes=0):
        super().__init__()
        self.patch = patch
        t, d = (img // patch) ** 2, ch * patch * patch
        self.blocks = nn.ModuleList(FlowBlock(d, t, c, layers, i % 2 == 1, classes) for i in range(blocks))

    def patchify(self, x):
        return F.unfold(x, self.patch, stride=self.patch).transpose(1, 2)

    def trajectory(self, x, y=None):
        """Tokens x^0 (N, T, D) -> [x^1, ..., x^B] (canonical token order) and the summed logdets."""
        out, logdets = [], 0
        for block in self.blocks:
            x, ld = block(x, y)
            out.append(x)
            logdets = logdets + ld
        return out, logdets

    def forward(self, x, y=None):
        traj, logdets = self.trajectory(self.patchify(x), y)
        return traj[-1], logdets


def bench(name, img, ch, patch, c, blocks, layers, batch, steps, warmup=3):
    torch.manual_seed(0)
    model = TarFlow(img, ch, patch, c, blocks, layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=1e-4)
    x = torch.rand(batch, ch, img, img) * 2 - 1
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        z, logdets = model(x + 0.05 * torch.randn_like(x))
        loss = 0.5 * z.pow(2).mean() - logdets.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    secs = time.perf_counter() - start
    return {
        "config": name,
        "stepsPerSec": steps / secs,
        "imagesPerSec": steps * batch / secs,
        "peakRssMiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = {
        "torch": torch.__version__,
        "threads": args.threads,
        "tiny": bench("tiny", 32, 1, 4, 256, 4, 2, 64, args.steps),
        "paper": bench("paper", 64, 4, 4, 512, 8, 1, 16, args.steps),
    }
    print(json.dumps(out))
