// The offline judge and eval-quality end to end: the judge learns MNIST, its yardsticks read ~0 / ~1
// for data against itself, large for noise, and near-zero recall for a collapsed sampler; wrong
// datasets, judges and models are refused without writing anything.
import {existsSync, mkdirSync, readdirSync} from 'node:fs'
import {join} from 'node:path'
import {beforeAll, describe, expect, it} from 'vitest'

import type {EvalQualityResult} from '../src/commands/eval-quality.js'
import {fixtures, runCli, runJson, tempDir, writeGreyPng} from './helpers.js'

const dir = tempDir('biflow-quality-')
const data = join(dir, 'mnist16')
const judge = join(dir, 'judge')

type Quality = EvalQualityResult

/** A folder of `count` grey 16x16 PNGs drawn by `pixel(i, x, y)`. */
function pngFolder(name: string, count: number, pixel: (i: number, x: number, y: number) => number): string {
  const out = join(dir, name)
  mkdirSync(out)
  for (let i = 0; i < count; i++) writeGreyPng(join(out, `${String(i).padStart(4, '0')}.png`), 16, (x, y) => pixel(i, x, y))
  return out
}

/** A failing command: exit code 1, the message on stderr, and `dir` exactly as it was. */
function fails(args: string[], message: RegExp) {
  const before = readdirSync(dir).sort()
  const r = runCli(args)
  expect(r.code, r.stderr).toBe(1)
  expect(r.stderr).toMatch(message)
  expect(readdirSync(dir).sort()).toEqual(before)
}

describe('biflow judge train / eval-quality', () => {
  let trained: {heldOutAccuracy: number; heldOutCount: number; usable: boolean}
  beforeAll(() => {
    runJson(['data', 'prepare', 'builtin:mnist', '--out', data, '--size', '16', '--limit', '3000', '--val-fraction', '0.2', '--seed', '1'])
    trained = runJson(['judge', 'train', '--data', data, '--out', judge, '--steps', '300', '--batch-size', '32', '--min-accuracy', '0.6'])
  })

  it('learns the classes far above chance and records it', () => {
    expect(trained.heldOutCount).toBe(600)
    expect(trained.heldOutAccuracy).toBeGreaterThan(0.75) // chance: 0.1
    expect(trained.usable).toBe(true)
    expect(readdirSync(judge).sort()).toEqual(['judge.json', 'weights.safetensors'])
    // An existing judge is not overwritten unasked.
    fails(['judge', 'train', '--data', data, '--out', judge, '--steps', '1'], /exists and is not empty: choose another --out, or add --force/)
  })

  it('reads ~0 FD_J and ~1 precision/recall for data against itself, a large FD_J for noise, ~0 recall for a collapsed sampler', () => {
    const self = runJson<Quality>(['eval-quality', data, '--judge', judge, '--data', data, '--num', '600'])
    expect(self.num).toBe(600)
    expect(self.numRef).toBe(600)
    expect(self.labelAccuracy).toBeGreaterThan(0.75) // the dataset's own labels
    expect(self.precision).toBeGreaterThan(0.8)
    expect(self.recall).toBeGreaterThan(0.8)
    expect(self.diversityRatio).toBeGreaterThan(0.85)
    expect(self.diversityRatio).toBeLessThan(1.15)

    // Uniform noise: far from the data by every measure.
    let seed = 12345
    const rand = () => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31) * 255
    const noise = runJson<Quality>(['eval-quality', pngFolder('noise', 200, () => rand()), '--judge', judge, '--data', data])
    expect(noise.labelAccuracy).toBeNull() // a folder has no labels
    expect(noise.diversityGroupedBy).toBe("judge's class")
    expect(noise.fd).toBeGreaterThan(20 * Math.max(self.fd, 1e-3))
    expect(noise.precision).toBeLessThan(0.1)

    // A sampler collapsed onto one image per class: 10 strokes, 20 copies each.
    const collapsed = runJson<Quality>([
      'eval-quality', pngFolder('collapsed', 200, (i, x, y) => (Math.abs(x - 3 - (i % 10)) < 2 && y > 2 && y < 13 ? 255 : 0)), '--judge', judge, '--data', data,
    ])
    expect(collapsed.recall).toBeLessThan(0.05)
    expect(collapsed.diversity).toBeLessThan(self.diversity as number)
    expect(collapsed.fd).toBeGreaterThan(self.fd)
    // Copies of one image: no diversity at all.
    const copies = runJson<Quality>(['eval-quality', pngFolder('copies', 50, (_i, x, y) => (Math.abs(x - 8) < 2 && y > 2 && y < 13 ? 255 : 0)), '--judge', judge, '--data', data])
    expect(copies.diversity).toBe(0)
    expect(copies.recall).toBe(0)
  })

  it('judges a run: samples of either method, labelled', () => {
    const f = join(dir, 'f')
    runJson(['train', '--data', data, '--out', f, '--steps', '20', '--channels', '64', '--blocks', '2', '--layers-per-block', '1', '--batch-size', '16', '--clip-scale', '3'])
    const r = runJson<Quality>(['eval-quality', '--model', f, '--method', 'exact', '--judge', judge, '--data', data, '--num', '30', '--guidance', '1'])
    expect(r.num).toBe(30)
    expect(r.source).toContain('exact samples')
    expect(r.labelAccuracy).toBeGreaterThanOrEqual(0)
    expect(r.samplingSeconds).toBeGreaterThan(0)
    for (const k of ['fd', 'precision', 'recall'] as const) expect(Number.isFinite(r[k]), k).toBe(true)
  })

  it('refuses an unlabelled dataset, a judge or a model of another shape, a judge below its floor', () => {
    const flat = join(dir, 'flat')
    runJson(['data', 'prepare', join(fixtures, 'data', 'folder-flat'), '--out', flat, '--size', '16', '--val-fraction', '0.5'])
    fails(['judge', 'train', '--data', flat, '--out', join(dir, 'j-flat')], /has no class labels/)
    fails(['eval-quality', data, '--judge', judge, '--data', flat], /has no class labels/)

    const small = join(dir, 'mnist12')
    runJson(['data', 'prepare', 'builtin:mnist', '--out', small, '--size', '12', '--limit', '200', '--val-fraction', '0.2'])
    fails(['eval-quality', small, '--judge', judge, '--data', small], /was trained on 1x16x16 images of 10 classes; the dataset .* has 1x12x12/)
    const f12 = join(dir, 'f12')
    runJson(['train', '--data', small, '--out', f12, '--steps', '2', '--channels', '64', '--blocks', '1', '--layers-per-block', '1', '--batch-size', '8'])
    fails(['eval-quality', '--model', f12, '--judge', judge, '--data', data], /makes 1x12x12 images of 10 classes; the dataset .* has 1x16x16/)
    fails(['eval-quality', join(dir, 'noise'), '--judge', data, '--data', data], /is not a judge/)

    const weak = join(dir, 'weak')
    const w = runJson<{usable: boolean}>(['judge', 'train', '--data', data, '--out', weak, '--steps', '2', '--min-accuracy', '0.99'])
    expect(w.usable).toBe(false)
    fails(['eval-quality', data, '--judge', weak, '--data', data], /below its floor of 99\.0%/)
    const both = runCli(['eval-quality', data, '--model', f12, '--judge', judge, '--data', data])
    expect(both.code).toBe(2)
    expect(existsSync(join(dir, 'j-flat'))).toBe(false)
  })
})
