#!/usr/bin/env node
// LPIPS benchmark (release build): the distance and its gradient with respect to the first image at
// 224 px, batch 16, on the CPU, with the f32 matmul ceiling of the same run. Prints one JSON object.
// PyTorch's lpips package side by side: python scripts/bench-lpips-pytorch.py (same arguments).
// Usage: npm run bench:lpips [-- --size 224 --batch 16 --rounds 2]
import {spawnSync} from 'node:child_process'
import {dirname, join} from 'node:path'
import {fileURLToPath} from 'node:url'

import {buildExample} from './lib/cargo-example.mjs'

const root = join(dirname(fileURLToPath(import.meta.url)), '..')
const run = spawnSync(buildExample(root, 'bench_lpips'), process.argv.slice(2), {cwd: root, encoding: 'utf8'})
if (run.status !== 0) {
  process.stderr.write(run.stderr)
  process.exit(run.status ?? 1)
}
const result = JSON.parse(run.stdout.trim().split('\n').at(-1))
console.log(JSON.stringify({benchmark: 'lpips', ...result}, null, 2))
