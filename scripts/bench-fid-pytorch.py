"""Side-by-side reference for `npm run bench:fid`: pytorch-fid's InceptionV3 (FID variant) loaded with the
fixture's formula weights, feature extraction images/s at batch 32 on CPU, and scipy's Frechet distance on
2048-dim covariances. Not part of the test suite; needs `pip install torch pytorch-fid` (PyPI).

    python scripts/bench-fid-pytorch.py [--batch 32] [--batches 3] [--dim 2048]
"""
import argparse, json, math, struct, time

import os, sys

import numpy as np
import torch
from pytorch_fid import inception as pfi
from pytorch_fid.fid_score import calculate_frechet_distance

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "lib"))
from formula import uniform  # noqa: E402

SALT = b"biflow-fid-fixture/"


def formula(name, shape):
    u = uniform(SALT, name, int(np.prod(shape)))
    if name.endswith("conv.weight"):
        v = (2 * u - 1) * math.sqrt(6 / (shape[1] * shape[2] * shape[3]))
    elif name.endswith("bn.weight"):
        v = 1 + 0.2 * (2 * u - 1)
    elif name.endswith("bn.bias") or name.endswith("bn.running_mean"):
        v = 0.02 * (2 * u - 1)
    elif name.endswith("bn.running_var"):
        v = 1 + 0.5 * u
    else:
        v = 0.02 * (2 * u - 1)
    return torch.from_numpy(v.astype(np.float32).reshape(shape))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--dim", type=int, default=2048)
    a = ap.parse_args()
    # Build the FID network without downloading: the same construction as pfi.fid_inception_v3, minus the load.
    inc = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    inc.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    inc.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    inc.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    inc.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    inc.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    inc.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    inc.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    inc.Mixed_7b = pfi.FIDInceptionE_1(1280)
    inc.Mixed_7c = pfi.FIDInceptionE_2(2048)
    sd = {k: formula(k, tuple(v.shape)) for k, v in inc.state_dict().items() if not k.endswith("num_batches_tracked")}
    inc.load_state_dict(sd, strict=False)
    orig = pfi.fid_inception_v3
    pfi.fid_inception_v3 = lambda: inc
    model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    pfi.fid_inception_v3 = orig
    x = torch.rand(a.batch, 3, 299, 299, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(x[:2])
        t = time.time()
        for _ in range(a.batches):
            model(x)
        secs = time.time() - t
    rng = np.random.default_rng(0)
    def cov():
        m = rng.random((a.dim, a.dim)) - 0.5
        return m @ m.T / a.dim
    s1, s2 = cov(), cov()
    mu1, mu2 = rng.random(a.dim), rng.random(a.dim)
    t = time.time()
    d = calculate_frechet_distance(mu1, s1, mu2, s2)
    fd = time.time() - t
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "batchSize": a.batch,
                      "batches": a.batches, "featureSeconds": secs, "imagesPerSecond": a.batch * a.batches / secs,
                      "frechetDim": a.dim, "frechetSeconds": fd, "frechetValue": float(d)}, indent=2))


if __name__ == "__main__":
    main()
