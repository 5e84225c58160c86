#!/usr/bin/env node
// VAE benchmark (release build): images/s of encoding and decoding with the full SD-VAE configuration (random
// weights) at 256 px, batch 8, on the CPU, with the f32 matmul ceiling of the same run. Prints one JSON object.
// diffusers side by side: python scripts/bench-vae-diffusers.py (same arguments).
// Usage: npm run bench:vae [-- --size 256 --batch 8 --rounds 1]
import {spawnSync} from 'node:child_process'
import {dirname, join} from 'node:path'
import {fileURLToPath} from 'node:url'

import {buildExample} from './lib/cargo-example.mjs'

const root = join(dirname(fileURLToPath(import.meta.url)), '..')
const run = spawnSync(buildExample(root, 'bench_vae'), process.argv.slice(2), {cwd: root, encoding: 'utf8'})
if (run.status !== 0) {
  process.stderr.write(run.stderr)
  process.exit(run.status ?? 1)
}
const result = JSON.parse(run.stdout.trim().split('\n').at(-1))
console.log(JSON.stringify({benchmark: 'vae', ...result}, null, 2))
