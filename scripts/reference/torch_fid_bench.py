"""Side-by-side baseline: pytorch-fid's Inception feature extraction on CPU at batch 32, and its
Frechet distance at 2048 dimensions. Not part of the test suite. The published weights cannot be
downloaded here, so the network keeps its random initialisation (same arithmetic, same speed).

    /tmp/venv-torch/bin/pip install torch pytorch-fid scipy
    /tmp/venv-torch/bin/python scripts/reference/torch_fid_bench.py [--threads 2] [--size 64]
"""
import argparse
import json
import time

import numpy as np
import torch
import pytorch_fid.inception as inc
from pytorch_fid.fid_score import calculate_frechet_distance

ap = argparse.ArgumentParser()
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--size", type=int, default=64, help="input image size (resized to 299 inside)")
ap.add_argument("--batches", type=int, default=3)
args = ap.parse_args()
torch.set_num_threads(args.threads)

inc.load_state_dict_from_url = lambda *a, **k: None
load = torch.nn.Module.load_state_dict
torch.nn.Module.load_state_dict = lambda self, sd, *a, **k: None
model = inc.InceptionV3([inc.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
torch.nn.Module.load_state_dict = load

x = torch.rand(32, 3, args.size, args.size)
with torch.no_grad():
    model(x)  # warm-up
    start = time.perf_counter()
    for _ in range(args.batches):
        model(x)
    secs = time.perf_counter() - start

rng = np.random.default_rng(0)
a = rng.standard_normal((4096, 2048))
b = rng.standard_normal((4096, 2048)) * 1.1 + 0.1
s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
t = time.perf_counter()
fid = calculate_frechet_distance(a.mean(0), s1, b.mean(0), s2)
fid_secs = time.perf_counter() - t
print(json.dumps({"torch": torch.__version__, "threads": args.threads, "inputSize": args.size,
                  "imagesPerSec": 32 * args.batches / secs, "frechet2048Seconds": fid_secs, "fid": float(fid)}))
