// BiFlow's reverse model against F's exact inverse (release build): `npm run bench:reverse`.
// Prints one JSON object (last stdout line): this CPU's f32 matmul GFLOP/s; for the tiny (T=64) and
// paper-shaped (T=256) configurations at batch 1 and 64, images/s of reverse sampling (one evaluation
// of G) and of exact sampling (causal decoding + its denoising step) with the FLOPs of each path; and
// where a distillation step's time goes. Env: BENCH_REVERSE_CONFIGS (default "tiny,paper"),
// BENCH_REVERSE_BATCHES (default "1,64"). PyTorch side by side: scripts/reference/torch_biflow_distill_bench.py.
import {execFileSync} from 'node:child_process'
import {dirname, join} from 'node:path'
import {fileURLToPath} from 'node:url'

import {buildExample} from './lib/cargo-example.mjs'

const root = join(dirname(fileURLToPath(import.meta.url)), '..')
const configs = (process.env.BENCH_REVERSE_CONFIGS ?? 'tiny,paper').split(',')
const batches = process.env.BENCH_REVERSE_BATCHES ?? '1,64'
const bin = buildExample(root, 'bench_reverse')
const result = {sample: [], distill: []}
for (const name of configs) {
  console.error(`bench:reverse ${name} (batches ${batches})...`)
  const out = execFileSync(bin, [name, 'all', '--batches', batches], {cwd: root, encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit']})
  for (const line of out.trim().split('\n')) {
    const r = JSON.parse(line)
    if (r.what === 'matmul') Object.assign(result, {matmulGflops: r.gflops, packedMatmulGflops: r.packedGflops})
    else result[r.what].push(r)
  }
}

console.log(JSON.stringify(result))
