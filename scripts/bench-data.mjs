// Benchmark of `biflow data prepare` (release build): generates 20,000 random 32x32 PNGs in a temp
// folder (in Rust, through the hidden core job data.synth), prepares them with the CLI, then reads
// the dataset back in random batches. Prints one JSON object:
//   {imagesPerSec, seconds, count, wallSeconds, read: {imagesPerSec, ...}}
// imagesPerSec/seconds are the prepare job's own timing (decode + write); wallSeconds includes the
// CLI start. Options: BENCH_COUNT (default 20000), BENCH_SIZE (default 32).
import {spawnSync} from 'node:child_process'
import {mkdtempSync, rmSync} from 'node:fs'
import {createRequire} from 'node:module'
import {tmpdir} from 'node:os'
import {dirname, join} from 'node:path'
import {fileURLToPath} from 'node:url'

const root = join(dirname(fileURLToPath(import.meta.url)), '..')
const count = Number(process.env.BENCH_COUNT ?? 20000)
const size = Number(process.env.BENCH_SIZE ?? 32)
const native = createRequire(import.meta.url)(join(root, 'native', 'index.cjs'))
const job = async (name, options) => JSON.parse(await native.runJob(name, JSON.stringify(options)))

const tmp = mkdtempSync(join(tmpdir(), 'biflow-bench-data-'))
try {
  const images = join(tmp, 'images')
  const t0 = performance.now()
  await job('data.synth', {out: images, count, size, classes: 10, seed: 1})
  console.error(`generated ${count} ${size}x${size} PNGs in ${((performance.now() - t0) / 1000).toFixed(1)}s`)

  const out = join(tmp, 'ds')
  const t1 = performance.now()
  const r = spawnSync(process.execPath, [join(root, 'bin', 'run.js'), 'data', 'prepare', images, '--out', out, '--json'], {
    encoding: 'utf8',
  })
  const wallSeconds = (performance.now() - t1) / 1000
  if (r.status !== 0) throw new Error(`data prepare failed (${r.status}): ${r.stderr}`)
  const prep = JSON.parse(r.stdout)
  if (prep.count !== count) throw new Error(`prepared ${prep.count} images, expected ${count}`)

  const read = await job('data.benchRead', {dir: out, count: 200000, batch: 256})
  console.log(
    JSON.stringify({
      imagesPerSec: Math.round(prep.imagesPerSec),
      seconds: Number(prep.seconds.toFixed(3)),
      count: prep.count,
      wallSeconds: Number(wallSeconds.toFixed(3)),
      size,
      read: {imagesPerSec: Math.round(read.imagesPerSec), seconds: Number(read.seconds.toFixed(3)), count: read.count, batch: 256},
    }),
  )
} finally {
  rmSync(tmp, {recursive: true, force: true})
}
