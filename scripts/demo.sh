#!/usr/bin/env bash
# The main job on the built-in dataset, end to end: MNIST -> a small TARFlow trained by maximum
# likelihood -> exact samples -> bits/dim on held-out images. Everything lands in demo/ (or $1),
# which this script owns: a previous demo there is replaced. About a minute on 2 idle CPU cores; the
# model is far too small and short-trained for good digits (DEMO_STEPS=5000 for recognisable ones).
# --clip-scale bounds the affine log-scales (BiFlow's norm control), which keeps the causal decoding
# of a barely trained model finite.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-demo}
steps=${DEMO_STEPS:-200}
biflow() { node bin/run.js "$@"; }

rm -rf "$out"
biflow data prepare builtin:mnist --out "$out/mnist" --size 32 --val-fraction 0.01
biflow data inspect "$out/mnist"
biflow train --data "$out/mnist" --out "$out/run" --steps "$steps" --save-every 200 \
  --channels 128 --blocks 4 --layers-per-block 1 --batch-size 32 --lr 1e-3 --noise-std 0.05 --clip-scale 3
biflow sample --model "$out/run" --method exact --num 16 --labels 0,1,2,3,4,5,6,7,8,9 --guidance 1 --out "$out/samples"
biflow eval-bpd --model "$out/run" --data "$out/mnist"
echo "demo finished: dataset preview $out/mnist/preview.png, loss curve $out/run/loss.png, samples $out/samples/grid.png"
