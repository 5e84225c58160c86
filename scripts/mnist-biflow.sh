#!/usr/bin/env bash
# The grids and eval-reverse numbers of docs/mnist/, on top of the quality benchmark's runs: builtin:mnist at
# 32 px, F with the demo's recipe, G distilled with the defaults (scripts/bench-quality.mjs trains what is
# missing), then one grid per method from the same noise and labels at guidance 0 / temperature 1 and at the
# demo's guidance 2 / temperature 0.6, eval-reverse, and a grid per ablation run when they exist
# (`node scripts/bench-quality.mjs --ablations STEPS`). The judge's numbers come from the benchmark itself.
#
#   bash scripts/mnist-biflow.sh [WORK_DIR]      # default WORK_DIR: bench-quality/ (git-ignored)
#
# Step counts come from the environment: F_STEPS (default 3000), G_STEPS (6000).
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-bench-quality}
docs=docs/mnist
biflow() { node bin/run.js "$@"; }
mkdir -p "$docs"

# F, the judge and G: trained (or resumed) by the benchmark, reused when complete; its JSON goes to docs.
node scripts/bench-quality.mjs --work "$work" --f-steps "${F_STEPS:-3000}" --g-steps "${G_STEPS:-6000}" > "$docs/bench-quality.json"

labels=0,1,2,3,4,5,6,7,8,9
grids() { # RUN NAME GUIDANCE TEMPERATURE METHODS...
  local run=$1 name=$2 guidance=$3 temperature=$4; shift 4
  for m in "$@"; do
    rm -rf "$work/grid-$name-$m"
    biflow sample --model "$run" --method "$m" --num 100 --labels $labels --seed 7 --guidance "$guidance" --temperature "$temperature" \
      --out "$work/grid-$name-$m" --json > "$docs/sample-$name-$m.json"
    cp "$work/grid-$name-$m/grid.png" "$docs/grid-$name-$m.png"
  done
}
grids "$work/g" unguided 0 1 reverse exact
grids "$work/g" guided 2 0.6 reverse exact
cp "$work/f/loss.png" "$docs/loss-forward.png"
cp "$work/g/loss.png" "$docs/loss-distill.png"
biflow eval-reverse --model "$work/g" --data "$work/mnist32" --limit 600 --num-exact 64 --json > "$docs/eval-reverse.json"
for v in align naive score-denoise no-norm no-cfg; do
  [ -f "$work/ab-$v-s0/weights.safetensors" ] && grids "$work/ab-$v-s0" "ablation-$v" 0 1 reverse
done
echo "done: $docs"
