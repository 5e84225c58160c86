"""Side-by-side baseline: exact causal decoding (TARFlow's inverse) with the reference code's own
`Model.reverse` (apple/ml-tarflow, transformer_flow.py), on CPU, for the same configs as
`cargo run --release -p biflow-core --example bench_flow -- CONFIG sample --num N`. Not part of the
test suite, and the reference code is not copied into this project: point --tarflow-src at a checkout.

    python -m venv /tmp/venv-torch && /tmp/venv-torch/bin/pip install torch numpy
    git clone https://github.com/apple/ml-tarflow /tmp/ml-tarflow
    /tmp/venv-torch/bin/python scripts/reference/torch_tarflow_decode_bench.py --tarflow-src /tmp/ml-tarflow \
        [--config tiny|paper] [--batch N] [--threads 2] [--repeats 3] [--guidance 0]

Weights are random (the reference initialisation), except that the zero-initialised output
projections get small normal weights, so that every step changes the tokens. Prints one JSON object.
"""
import argparse
import json
import resource
import statistics
import sys
import time

import torch

CONFIGS = {
    # MNIST at 32x32, patch 4: T = 64, D = 16.
    "tiny": dict(in_channels=1, img_size=32, patch_size=4, channels=256, num_blocks=4, layers_per_block=2, batch=16),
    # 64x64x4 latents, patch 4: T = 256, D = 64.
    "paper": dict(in_channels=4, img_size=64, patch_size=4, channels=512, num_blocks=8, layers_per_block=1, batch=16),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tarflow-src", required=True, help="directory holding ml-tarflow's transformer_flow.py")
    ap.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--guidance", type=float, default=0.0)
    ap.add_argument("--classes", type=int, default=10)
    args = ap.parse_args()

    sys.path.insert(0, args.tarflow_src)
    import transformer_flow  # noqa: E402  (the reference implementation)

    torch.set_num_threads(args.threads)
    cfg = dict(CONFIGS[args.config])
    batch = args.batch or cfg.pop("batch")
    cfg.pop("batch", None)
    torch.manual_seed(0)
    model = transformer_flow.Model(num_classes=args.classes, **cfg).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight.normal_(0.0, 0.01)
    t = model.num_patches
    d = cfg["in_channels"] * cfg["patch_size"] ** 2
    z = torch.randn(batch, t, d)
    y = torch.arange(batch) % args.classes

    def run():
        with torch.no_grad():
            x = model.reverse(z.clone(), y, guidance=args.guidance)
        assert torch.isfinite(x).all()

    for _ in range(args.warmup):
        run()
    rates = []
    cpu0 = time.process_time()
    for _ in range(args.repeats):
        start = time.perf_counter()
        run()
        rates.append(batch / (time.perf_counter() - start))
    cpu = (time.process_time() - cpu0) / args.repeats
    print(json.dumps({
        "config": args.config,
        "what": "exact-sample (ml-tarflow Model.reverse)",
        "batch": batch,
        "guidance": args.guidance,
        "imagesPerSecond": statistics.mean(rates),
        "imagesPerSecondRuns": [round(r, 3) for r in rates],
        # CPU seconds of this process per decode (all threads; OpenMP threads that spin while
        # waiting count too, so on a busy machine this overstates the work).
        "cpuSeconds": cpu,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "peakRssMiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


if __name__ == "__main__":
    main()
