#!/usr/bin/env bash
# BiFlow end to end on builtin:mnist at 32 px, the numbers and grids of docs/mnist/: a forward flow F
# trained by maximum likelihood, its reverse model G distilled, one grid per method from the same
# noise and labels, eval-reverse, and a small ablation table (align vs naive, learned vs score-based
# denoising, RMS norm control vs none) where every variant gets the same distillation budget.
#
#   bash scripts/mnist-biflow.sh [WORK_DIR]      # default WORK_DIR: mnist-biflow/ (git-ignored)
#
# Step counts come from the environment: F_STEPS (default 3000), G_STEPS (1000), ABLATION_STEPS (400); the
# grids sample at GUIDANCE (default 2) and noise TEMPERATURE (default 0.6).
# Runs resume where they stopped when the script is run again.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-mnist-biflow}
docs=docs/mnist
f_steps=${F_STEPS:-3000}
g_steps=${G_STEPS:-1000}
ab_steps=${ABLATION_STEPS:-400}
guidance=${GUIDANCE:-2}
temperature=${TEMPERATURE:-0.6}
biflow() { node bin/run.js "$@"; }
mkdir -p "$work" "$docs"
seconds() { date +%s; }

# Train (or resume) a run until its configured step count; a finished run is left as it is.
finished() { [ -f "$1/weights.safetensors" ] && grep -q "\"step\":$2," "$1/metrics.jsonl" 2>/dev/null; }

[ -f "$work/mnist/manifest.json" ] || biflow data prepare builtin:mnist --out "$work/mnist" --size 32 --val-fraction 0.01
t0=$(seconds)
if ! finished "$work/f" "$f_steps"; then
  if [ -f "$work/f/config.json" ]; then biflow train --out "$work/f" --resume
  else biflow train --data "$work/mnist" --out "$work/f" --steps "$f_steps" --save-every 500 \
    --channels 128 --blocks 4 --layers-per-block 1 --batch-size 64 --lr 2e-3 --noise-std 0.1 --clip-scale 3; fi
fi
t1=$(seconds)
distill() { # OUT STEPS [flags...]
  local out=$1 steps=$2; shift 2
  finished "$out" "$steps" && return 0
  if [ -f "$out/config.json" ]; then biflow distill --out "$out" --resume
  else biflow distill --forward "$work/f" --data "$work/mnist" --out "$out" --steps "$steps" --save-every 250 --lr 2e-3 "$@"; fi
}
distill "$work/g" "$g_steps"
t2=$(seconds)
echo "{\"forwardSteps\": $f_steps, \"forwardSeconds\": $((t1 - t0)), \"distillSteps\": $g_steps, \"distillSeconds\": $((t2 - t1))}" > "$docs/timing.json"

labels=0,1,2,3,4,5,6,7,8,9
rm -rf "$work/samples-reverse" "$work/samples-exact"
biflow sample --model "$work/g" --method reverse --num 100 --labels $labels --seed 7 --guidance "$guidance" --temperature "$temperature" --out "$work/samples-reverse" --json > "$docs/sample-reverse.json"
biflow sample --model "$work/g" --method exact --num 100 --labels $labels --seed 7 --guidance "$guidance" --temperature "$temperature" --out "$work/samples-exact" --json > "$docs/sample-exact.json"
cp "$work/samples-reverse/grid.png" "$docs/grid-reverse.png"
cp "$work/samples-exact/grid.png" "$docs/grid-exact.png"
cp "$work/f/loss.png" "$docs/loss-forward.png"
cp "$work/g/loss.png" "$docs/loss-distill.png"
biflow eval-reverse --model "$work/g" --data "$work/mnist" --limit 600 --num-exact 64 --json > "$docs/eval-reverse.json"

# Ablations: the same budget for each variant.
distill "$work/ab-align" "$ab_steps"
distill "$work/ab-naive" "$ab_steps" --loss naive
distill "$work/ab-score-denoise" "$ab_steps" --denoise none
distill "$work/ab-no-norm" "$ab_steps" --align-norm none
for v in align naive score-denoise no-norm; do
  biflow eval-reverse --model "$work/ab-$v" --data "$work/mnist" --limit 600 --num-exact 64 --json > "$docs/ablation-$v.json"
  rm -rf "$work/ab-$v-samples"
  biflow sample --model "$work/ab-$v" --num 100 --labels $labels --seed 7 --guidance "$guidance" --temperature "$temperature" --out "$work/ab-$v-samples" --json > /dev/null
  cp "$work/ab-$v-samples/grid.png" "$docs/ablation-$v.png"
done
echo "done: $docs"
