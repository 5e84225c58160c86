#!/usr/bin/env node
// FID benchmark (release build): Inception feature extraction images/s at batch 32 (formula weights) and
// the time of one 2048-dimensional Frechet distance. Prints one JSON object on stdout.
// Usage: npm run bench:fid [-- --batch 32 --batches 3 --dim 2048]
import {spawnSync} from 'node:child_process'
import {dirname, join} from 'node:path'
import {fileURLToPath} from 'node:url'

import {buildExample} from './lib/cargo-example.mjs'

const root = join(dirname(fileURLToPath(import.meta.url)), '..')
const args = process.argv.slice(2)
const run = spawnSync(buildExample(root, 'bench_fid'), args, {cwd: root, encoding: 'utf8'})
if (run.status !== 0) {
  process.stderr.write(run.stderr)
  process.exit(run.status ?? 1)
}
const result = JSON.parse(run.stdout.trim().split('\n').at(-1))
console.log(JSON.stringify({benchmark: 'fid', ...result}, null, 2))
