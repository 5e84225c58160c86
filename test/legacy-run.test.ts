// Backward compatibility: run folders, checkpoints and a bundle written by an earlier build
// (fixtures/legacy-run, made by scripts/make-legacy-run.sh) still load, resume and sample as they did.
import {cpSync, readFileSync, writeFileSync} from 'node:fs'
import {join} from 'node:path'
import {beforeAll, describe, expect, it} from 'vitest'

import {fixtures, runJson, tempDir} from './helpers.js'

// The script's thread count: a resumed run repeats the uninterrupted one bit for bit only at the same count.
process.env.RAYON_NUM_THREADS = '2'

// Exact (0) on the machine that wrote the fixture; another CPU may round differently (SIMD width, FMA
// in the kernels), so allow float noise. A wrong resume moves weights by ~lr = 1e-2 per step.
const TOL = 1e-4

const legacy = join(fixtures, 'legacy-run')
const sample = ['--device', 'cpu', '--num', '4', '--labels', '0,1,2,3', '--seed', '7', '--format', 'npy']
let work: string

beforeAll(() => {
  work = tempDir('biflow-legacy-')
})

/** A fresh copy of the fixture. G records F by absolute path (where the script ran): point it at the copy's F. */
function copy(name: string): string {
  const dir = join(work, name)
  cpSync(legacy, dir, {recursive: true})
  const file = join(dir, 'g', 'config.json')
  const text = readFileSync(file, 'utf8')
  const old = JSON.parse(text).forward.dir as string
  writeFileSync(file, text.split(JSON.stringify(old)).join(JSON.stringify(join(dir, 'f')))) // only the path changes
  return dir
}

/** float32 data and header of a .npy file (version 1, little-endian f4, C order). */
function readNpy(path: string): {header: string; data: Float32Array} {
  const b = readFileSync(path)
  expect(b.subarray(0, 6).toString('latin1')).toBe('\x93NUMPY')
  const len = b.readUInt16LE(8)
  const header = b.toString('latin1', 10, 10 + len)
  expect(header).toContain("'descr': '<f4'")
  const body = b.subarray(10 + len)
  return {header, data: new Float32Array(body.buffer.slice(body.byteOffset, body.byteOffset + body.length))}
}

/** Every f32 tensor of a .safetensors file (8-byte header length, JSON header, raw little-endian data). */
function readSafetensors(path: string): Map<string, Float32Array> {
  const b = readFileSync(path)
  const n = Number(b.readBigUInt64LE(0))
  const header = JSON.parse(b.toString('utf8', 8, 8 + n)) as Record<string, {dtype: string; data_offsets: [number, number]}>
  const out = new Map<string, Float32Array>()
  for (const [name, t] of Object.entries(header)) {
    if (name === '__metadata__') continue
    expect(t.dtype, name).toBe('F32')
    const [s, e] = t.data_offsets.map((o) => 8 + n + o)
    out.set(name, new Float32Array(b.buffer.slice(b.byteOffset + s, b.byteOffset + e)))
  }
  return out
}

/** max |a - b| (NaN when either holds a NaN, which then fails any bound). */
function maxDiff(a: Float32Array, b: Float32Array): number {
  expect(a.length).toBe(b.length)
  let m = 0
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]))
  return m
}

/** `biflow sample` into `out`, compared with the committed samples in fixtures/legacy-run/`ref`. */
function expectSamples(args: string[], out: string, ref: string): void {
  runJson(['sample', ...args, ...sample, '--out', out])
  const [a, b] = [readNpy(join(out, 'samples.npy')), readNpy(join(legacy, ref, 'samples.npy'))]
  expect(a.header).toBe(b.header) // same shape
  expect(maxDiff(a.data, b.data), ref).toBeLessThanOrEqual(TOL)
  expect(readFileSync(join(out, 'labels.npy')).equals(readFileSync(join(legacy, ref, 'labels.npy')))).toBe(true)
}

function expectWeights(path: string, ref: string): void {
  const [a, b] = [readSafetensors(path), readSafetensors(join(legacy, ref))]
  expect([...a.keys()].sort()).toEqual([...b.keys()].sort())
  for (const [name, t] of b) expect(maxDiff(a.get(name)!, t), `${ref}: ${name}`).toBeLessThanOrEqual(TOL)
}

describe('legacy run folders and bundles', () => {
  it('samples the committed F (exact) and G (reverse, guided) as when they were written', () => {
    const dir = copy('sample')
    expectSamples(['--model', join(dir, 'f'), '--method', 'exact'], join(dir, 'out-f'), 'f-exact')
    expectSamples(['--model', join(dir, 'g'), '--method', 'reverse', '--guidance', '2'], join(dir, 'out-g'), 'g-reverse')
  })

  // The fixture keeps only the step-3 checkpoints; weights.safetensors are the step-6 EMA weights.
  // Separate copies: G's record of F is a checksum, which F's resumed weights may miss by float noise.
  it('resumes F from its step-3 checkpoint to the committed step-6 weights', () => {
    const dir = copy('resume-f')
    const r = runJson<{resumedFrom: number; steps: number}>(['train', '--out', join(dir, 'f'), '--resume', '--data', join(dir, 'data'), '--device', 'cpu'])
    expect(r).toMatchObject({resumedFrom: 3, steps: 6})
    expectWeights(join(dir, 'f', 'weights.safetensors'), 'f/weights.safetensors')
    const steps = readFileSync(join(dir, 'f', 'metrics.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l).step)
    expect(steps).toEqual([1, 2, 3, 4, 5, 6])
  })

  it('resumes G from its step-3 checkpoint to the committed step-6 weights', () => {
    const dir = copy('resume-g')
    const r = runJson<{resumedFrom: number; steps: number}>(['distill', '--out', join(dir, 'g'), '--resume', '--data', join(dir, 'data'), '--device', 'cpu'])
    expect(r).toMatchObject({resumedFrom: 3, steps: 6})
    expectWeights(join(dir, 'g', 'weights.safetensors'), 'g/weights.safetensors')
  })

  it('imports the committed bundle, which samples as the committed G and (exact, through its F) as F', () => {
    const run = join(work, 'imported')
    expect(runJson<{kind: string}>(['import', 'bundle', join(legacy, 'g.tar.gz'), '--out', run]).kind).toBe('distilled')
    expectSamples(['--model', run, '--method', 'reverse', '--guidance', '2'], join(work, 'bundle-g'), 'g-reverse')
    expectSamples(['--model', run, '--method', 'exact'], join(work, 'bundle-f'), 'f-exact')
  })
})
