#!/usr/bin/env bash
# Writes fixtures/legacy-run/ with the CLI of the repo root given as $1 (e.g. a frozen build of an
# older commit): run folders, checkpoints and a bundle in that version's formats, plus reference
# samples, for test/legacy-run.test.ts to check that newer code still loads, resumes and samples them.
#
#   data/        builtin:mnist, 32 images at 8x8 (grey, 10 classes)
#   f/           forward flow F, 6 steps; checkpoint step 3 kept, weights.safetensors = step-6 EMA
#   g/           G distilled from f/, 6 steps; same layout
#   g.tar.gz     `biflow export g`
#   f-exact/     samples.npy + labels.npy: F, exact method (--seed 7, labels 0..3)
#   g-reverse/   samples.npy + labels.npy: G, reverse method, guidance 2 (same seed and labels)
#
# The step-6 checkpoints are deleted: the test resumes from step 3 and must end at the committed
# step-6 weights (a checkpoint is 4x the weights; dropping them halves the fixture). Reports and loss
# plots are outputs nobody reads back, so they go too. The lr is high and constant so that a wrongly
# restored step (optimizer, data position, RNG) moves the weights far more than the test's tolerance.
set -euo pipefail
cli=$(cd "${1:?usage: scripts/make-legacy-run.sh REPO_ROOT (whose bin/run.js writes the fixture)}" && pwd)
out=$(cd "$(dirname "$0")/.." && pwd)/fixtures/legacy-run
export RAYON_NUM_THREADS=2 # resume is bit for bit only at the same thread count; the test pins it too
biflow() { node "$cli/bin/run.js" "$@" >/dev/null; }

rm -rf "$out"
mkdir -p "$out"
cd "$out"
biflow data prepare builtin:mnist --out data --size 8 --limit 32
biflow train --data data --out f --device cpu --patch-size 2 --channels 64 --blocks 1 --layers-per-block 1 \
  --batch-size 8 --steps 6 --save-every 3 --keep 2 --lr 1e-2 --min-lr 1e-2 --clip-scale 3 --seed 1
biflow distill --forward f --data data --out g --device cpu --batch-size 8 --steps 6 --save-every 3 --keep 2 \
  --lr 1e-2 --seed 2
biflow export g --out g.tar.gz
sample=(--device cpu --num 4 --labels 0,1,2,3 --seed 7 --format npy)
biflow sample --model f --method exact "${sample[@]}" --out f-exact
biflow sample --model g --method reverse --guidance 2 "${sample[@]}" --out g-reverse

rm -rf f/checkpoints/step-00000006 g/checkpoints/step-00000006 f/report.html g/report.html f/loss.png g/loss.png
test ! -e f/lock.json && test ! -e g/lock.json
du -sh "$out"
