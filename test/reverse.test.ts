// BiFlow's reverse model end to end: distill a small forward run on MNIST, sample it both ways from
// the same noise, evaluate it, edit in noise space, and refuse bad input without touching the disk.
import {existsSync, readdirSync} from 'node:fs'
import {join} from 'node:path'
import {beforeAll, describe, expect, it} from 'vitest'

import {runCli, runJson, tempDir, writeGreyPng} from './helpers.js'

const dir = tempDir('biflow-reverse-')
const data = join(dir, 'mnist')
const f = join(dir, 'f')
const g = join(dir, 'g')

interface SampleResult {
  method: string
  num: number
  files: string[]
  samplingSeconds: number
  imagesPerSecond: number
  denoised: boolean
}

describe('biflow distill / sample --method reverse / eval-reverse / edit', () => {
  beforeAll(() => {
    runJson(['data', 'prepare', 'builtin:mnist', '--out', data, '--size', '16', '--limit', '640', '--val-fraction', '0.1'])
    runJson(['train', '--data', data, '--out', f, '--steps', '40', '--channels', '64', '--blocks', '2', '--layers-per-block', '1', '--batch-size', '16', '--lr', '2e-3', '--clip-scale', '3'])
    const r = runJson<{steps: number; forward: string; recon: number; align: number}>([
      'distill', '--forward', f, '--data', data, '--out', g, '--steps', '40', '--batch-size', '16', '--lr', '2e-3', '--save-every', '20',
    ])
    expect(r.steps).toBe(40)
    expect(r.recon).toBeGreaterThan(0)
    expect(r.align).toBeGreaterThan(0)
  })

  it('samples a distilled run in one evaluation by default, and exactly through its F from the same noise', () => {
    const rev = runJson<SampleResult>(['sample', '--model', g, '--num', '8', '--labels', '0,1,2,3', '--seed', '3', '--out', join(dir, 's-rev')])
    expect(rev.method).toBe('reverse')
    expect(rev.denoised).toBe(false) // G denoises itself
    expect(rev.samplingSeconds).toBeGreaterThan(0)
    expect(rev.imagesPerSecond).toBeGreaterThan(0)
    expect(rev.files.map((p) => p.split('/').pop())).toContain('grid.png')
    const ex = runJson<SampleResult>(['sample', '--model', g, '--method', 'exact', '--num', '8', '--labels', '0,1,2,3', '--seed', '3', '--out', join(dir, 's-ex')])
    expect(ex.method).toBe('exact')
    expect(ex.denoised).toBe(true)
    // Guided sampling is still one evaluation of G; npy output carries the labels.
    const guided = runJson<SampleResult>(['sample', '--model', g, '--guidance', '2', '--labels', '7', '--num', '4', '--format', 'npy', '--out', join(dir, 's-g')])
    expect(guided.files.map((p) => p.split('/').pop()).sort()).toEqual(['labels.npy', 'samples.npy'])
    // A temperature scales the drawn noise: cooler noise, samples closer to the mode.
    const cool = runJson<SampleResult>(['sample', '--model', g, '--temperature', '0.5', '--num', '4', '--seed', '3', '--format', 'npy', '--out', join(dir, 's-cool')])
    expect(cool.num).toBe(4)
    // A flag that is not a number is a usage error (exit 2); 0 is refused by the core (exit 1).
    for (const [t, code] of [['0', 1], ['warm', 2]] as const) {
      const hot = runCli(['sample', '--model', g, '--temperature', t, '--out', join(dir, 's-hot')])
      expect(hot.code).toBe(code)
      expect(hot.stderr).toMatch(/--temperature must be a number/)
      expect(existsSync(join(dir, 's-hot'))).toBe(false)
    }
    // A forward run has no reverse model.
    const bad = runCli(['sample', '--model', f, '--method', 'reverse', '--out', join(dir, 's-bad')])
    expect(bad.code).toBe(1)
    expect(bad.stderr).toContain('needs a distilled run')
    expect(existsSync(join(dir, 's-bad'))).toBe(false)
  })

  it('evaluates G against the data and the exact inverse', () => {
    const r = runJson<Record<string, number>>(['eval-reverse', '--model', g, '--data', data, '--limit', '32', '--num-exact', '4'])
    for (const k of ['reconstructionMse', 'reconstructionPsnr', 'reverseVsExactMse', 'bpdReverseSamples', 'bpdExactSamples', 'bpdData']) {
      expect(Number.isFinite(r[k]), k).toBe(true)
    }
    expect(r.num).toBe(32)
    expect(r.reconstructionMse).toBeGreaterThan(0)
  })

  it('inpaints and class-edits in noise space; a mask of the wrong size is a clear error that writes nothing', () => {
    const img = join(dir, 'digit.png')
    writeGreyPng(img, 16, (x, y) => (Math.abs(x - 8) < 3 && y > 2 && y < 13 ? 255 : 0))
    const mask = join(dir, 'mask.png')
    writeGreyPng(mask, 16, (_x, y) => (y >= 8 ? 255 : 0))
    const inpaint = runJson<{kind: string; files: string[]}>(['edit', '--model', g, '--image', img, '--mask', mask, '--num', '3', '--out', join(dir, 'e1')])
    expect(inpaint.kind).toBe('inpaint')
    expect(readdirSync(join(dir, 'e1')).sort()).toEqual(['edit-000.png', 'edit-001.png', 'edit-002.png', 'grid.png', 'input.png'])
    const cls = runJson<{kind: string}>(['edit', '--model', g, '--image', img, '--label', '1', '--to-class', '7', '--out', join(dir, 'e2')])
    expect(cls.kind).toBe('class')
    const small = join(dir, 'small-mask.png')
    writeGreyPng(small, 8, () => 255)
    const r = runCli(['edit', '--model', g, '--image', img, '--mask', small, '--out', join(dir, 'e3')])
    expect(r.code).toBe(1)
    expect(r.stderr).toContain('is 8x8; this model works on 16x16 images')
    expect(existsSync(join(dir, 'e3'))).toBe(false)
  })

  it('refuses a forward run that is not a run, a distilled run as F, and data that does not fit F', () => {
    const notRun = runCli(['distill', '--forward', data, '--data', data, '--out', join(dir, 'x1')])
    expect(notRun.code).toBe(1)
    expect(notRun.stderr).toContain('not a biflow run')
    const distilledF = runCli(['distill', '--forward', g, '--data', data, '--out', join(dir, 'x2')])
    expect(distilledF.stderr).toContain('is a distilled run')
    const other = join(dir, 'mnist8')
    runJson(['data', 'prepare', 'builtin:mnist', '--out', other, '--size', '8', '--limit', '64'])
    const mismatch = runCli(['distill', '--forward', f, '--data', other, '--out', join(dir, 'x3')])
    expect(mismatch.code).toBe(1)
    expect(mismatch.stderr).toContain('does not match the forward model')
    for (const x of ['x1', 'x2', 'x3']) expect(existsSync(join(dir, x))).toBe(false)
  })

  it('resumes a distilled run and explains itself in --help', () => {
    const r = runJson<{steps: number; resumedFrom: number}>(['distill', '--out', g, '--resume', '--steps', '44'])
    expect(r.resumedFrom).toBe(40)
    expect(r.steps).toBe(44)
    const help = runCli(['distill', '--help'])
    expect(help.stdout).toContain('hidden')
    expect(help.stdout).toContain('--cfg-range')
  })
  it('refuses a device this build or machine cannot give, clearly and before writing anything', () => {
    const doctor = runJson<{features: string[]; cuda: {built: boolean; devices: string[]}; threads: number; defaultDevice: string; kernels: Record<string, string>}>(['doctor'])
    expect(doctor.threads).toBeGreaterThan(0)
    expect(Object.keys(doctor.kernels).sort()).toEqual(['convolution', 'elementwise', 'frozenLinear', 'matmul'])
    const img = join(dir, 'dev-in.png')
    writeGreyPng(img, 16, (x) => x * 16)
    const out = (name: string) => join(dir, `dev-${name}`)
    const jobs: string[][] = [
      ['train', '--data', data, '--out', out('train'), '--steps', '2'],
      ['distill', '--forward', f, '--data', data, '--out', out('distill'), '--steps', '2'],
      ['sample', '--model', g, '--num', '2', '--out', out('sample')],
      ['edit', '--model', g, '--image', img, '--to-class', '1', '--out', out('edit')],
      ['eval-bpd', '--model', f, '--data', data],
      ['eval-reverse', '--model', g, '--data', data],
      ['eval-fid', g, '--num', '2', '--save-stats', `${out('fid')}.npz`],
    ]
    for (const job of jobs) {
      if (!doctor.cuda.built) {
        const r = runCli([...job, '--device', 'cuda'])
        expect(r.code, job[0]).not.toBe(0)
        expect(r.stderr, job[0]).toContain('built without CUDA')
      } else if (doctor.cuda.devices.length === 0) {
        expect(runCli([...job, '--device', 'cuda']).stderr, job[0]).toContain('--device cpu')
      }

      const bad = runCli([...job, '--device', 'cuda:x'])
      expect(bad.code, job[0]).not.toBe(0)
      expect(bad.stderr, job[0]).toContain('expected auto, cpu, cuda or cuda:N')
      const bf16 = runCli([...job, '--device', 'cpu', '--precision', 'bf16'])
      expect(bf16.code, job[0]).not.toBe(0)
      expect(bf16.stderr, job[0]).toContain('bf16 runs on CUDA only')
    }

    for (const name of ['train', 'distill', 'sample', 'edit', 'fid.npz']) expect(existsSync(out(name)), name).toBe(false)
    if (!doctor.cuda.built) {
      expect(doctor.features).toEqual([])
      expect(doctor.defaultDevice).toBe('cpu')
    }
  })
})
