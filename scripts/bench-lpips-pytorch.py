"""Side-by-side reference for crates/biflow-core/examples/bench_lpips.rs: the lpips package 0.1.4 (VGG,
v0.1) on the parity fixture's formula backbone, distance and gradient with respect to the first image,
at a size and batch, on the CPU (torch's threads set to the cores biflow uses). Not part of the tests;
needs `pip install torch lpips==0.1.4 numpy safetensors` (PyPI).

    python scripts/bench-lpips-pytorch.py [--size 224] [--batch 16] [--rounds 2] [--threads 2]
"""
import argparse, importlib.util, json, os, resource, time

import lpips
import torch

here = os.path.dirname(__file__)
spec = importlib.util.spec_from_file_location("fixtures", os.path.join(here, "make-lpips-fixtures.py"))
fx = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fx)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = lpips.LPIPS(net="vgg", version="0.1", pretrained=True, pnet_rand=True, verbose=False).eval()
    sd = model.state_dict()
    for i in fx.CONVS:
        stage = 1 + sum(i >= s for s in (4, 9, 16, 23))
        for part in ("weight", "bias"):
            key = f"net.slice{stage}.{i}.{part}"
            sd[key] = fx.backbone_tensor(f"features.{i}.{part}", tuple(sd[key].shape))
    model.load_state_dict(sd)
    x0 = (torch.rand(a.batch, 3, a.size, a.size) * 2 - 1).requires_grad_(True)
    x1 = torch.rand(a.batch, 3, a.size, a.size) * 2 - 1

    def step():
        x0.grad = None
        model(x0, x1).sum().backward()

    step()
    t = time.perf_counter()
    for _ in range(a.rounds):
        step()
    secs = (time.perf_counter() - t) / a.rounds
    print(json.dumps({"what": "torch lpips forward+backward", "torch": torch.__version__, "size": a.size, "batch": a.batch,
                      "threads": a.threads, "secondsPerPass": secs, "pairsPerSecond": a.batch / secs,
                      "peakRssMiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
    main()
