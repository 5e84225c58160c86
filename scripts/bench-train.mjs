// Training throughput of the forward flow (release build): `npm run bench:train`.
// Prints one JSON object (last stdout line): steps/s, images/s, peak memory (VmHWM) for the tiny and the
// paper-shaped configurations of issue 3. Env: BENCH_TRAIN_STEPS (default 12), BENCH_TRAIN_CONFIGS
// (default "tiny,paper"). The PyTorch side-by-side is scripts/reference/torch_tarflow_train_bench.py.
import {execFileSync} from 'node:child_process'
import {dirname, join} from 'node:path'
import {fileURLToPath} from 'node:url'

import {buildExample} from './lib/cargo-example.mjs'

const root = join(dirname(fileURLToPath(import.meta.url)), '..')
const steps = process.env.BENCH_TRAIN_STEPS ?? '12'
const configs = (process.env.BENCH_TRAIN_CONFIGS ?? 'tiny,paper').split(',')
const bin = buildExample(root, 'bench_train')
const result = {}
for (const name of configs) {
  console.error(`bench:train ${name} (${steps} steps)...`)
  // One process per configuration so that the peak memory is that configuration's.
  const warm = String(Math.min(3, Math.max(1, Math.floor(Number(steps) / 3))))
  const out = execFileSync(bin, [name, steps, warm], {cwd: root, encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit']})
  result[name] = JSON.parse(out.trim().split('\n').at(-1))
}

console.log(JSON.stringify(result))
