// `biflow demo --quick` end to end: data, F, G, both sampling methods, evaluations and the report;
// a second run reuses the complete runs instead of training again.
import {existsSync, readFileSync, readdirSync} from 'node:fs'
import {join} from 'node:path'
import {describe, expect, it} from 'vitest'

import {native} from '../src/lib/native.js'
import {fixtures, runCli, runJson, tempDir} from './helpers.js'

interface DemoResult {
  report: string
  forward: string
  biflow: string
  samples: {reverse: string; exact: string}
  evaluation: {
    bitsPerDim: {value: number}
    evalReverse: Record<string, number>
    sampling: {reverse: {seconds: number; networkSteps: number}; exact: {seconds: number; networkSteps: number}}
    reverseSpeedupOverExact: number
    quality?: {exact: {num: number; fd: number}; reverse: {num: number; fd: number}}
  }
  seconds: number
}

describe('biflow demo --quick', () => {
  it('refuses a device it cannot have before preparing anything', () => {
    const out = join(tempDir('biflow-demo-dev-'), 'demo')
    const r = runCli(['demo', '--quick', '--out', out, '--device', 'cuda:x'])
    expect(r.code).not.toBe(0)
    expect(r.stderr).toContain('expected auto, cpu, cuda or cuda:N')
    expect(existsSync(out)).toBe(false)
  })

  it('runs BiFlow end to end and writes the report, grids and runs', async () => {
    const out = join(tempDir('biflow-demo-'), 'demo')
    const r = runJson<DemoResult>(['demo', '--quick', '--out', out, '--judge', join(out, 'judge')])
    console.log(`demo --quick took ${r.seconds.toFixed(1)} s`)
    const e = r.evaluation
    expect(Number.isFinite(e.bitsPerDim.value) && e.bitsPerDim.value > 0).toBe(true)
    for (const k of ['reconstructionMse', 'reconstructionPsnr', 'reverseVsExactMse', 'bpdReverseSamples', 'bpdExactSamples', 'bpdData']) {
      expect(Number.isFinite(e.evalReverse[k]), k).toBe(true)
    }
    expect(e.sampling.reverse.networkSteps).toBe(1)
    expect(e.sampling.exact.networkSteps).toBeGreaterThan(1)
    expect(e.sampling.reverse.seconds).toBeGreaterThan(0)
    expect(Number.isFinite(e.reverseSpeedupOverExact)).toBe(true)
    expect(existsSync(r.samples.reverse) && existsSync(r.samples.exact)).toBe(true)
    expect(readdirSync(join(r.forward, 'samples')).length).toBeGreaterThan(0)
    expect(readdirSync(join(r.biflow, 'samples')).length).toBeGreaterThan(0)
    const html = readFileSync(r.report, 'utf8')
    expect(html).toContain('reverse: learned G')
    expect(html).toContain('exact: causal decoding')
    expect(html).toContain('PSNR')
    // The judge's table, both samplers side by side.
    for (const m of ['exact', 'reverse'] as const) {
      expect(e.quality?.[m].num, m).toBe(200)
      expect(Number.isFinite(e.quality?.[m].fd), m).toBe(true)
    }
    expect(html).toContain('Frechet distance in the judge')
    expect(html).toContain('biflow demo --quick')

    const runs = runJson<{runs: {dir: string; kind: string; status: string}[]}>(['runs', out]).runs
    expect(runs.map((x) => [x.dir.split('/').pop(), x.kind, x.status])).toEqual([
      ['biflow', 'distilled', 'complete'],
      ['forward', 'forward', 'complete'],
    ])

    // Reconstruction LPIPS from eval-reverse (the fixture's formula VGG16 and the real v0.1 heads).
    const vgg = join(out, 'vgg.safetensors')
    await native().runJob('lpips.formulaWeights', JSON.stringify({output: vgg}))
    const heads = join(fixtures, 'lpips', 'vgg-lin-v0.1.pth')
    const data = join(out, 'mnist-16')
    const ev = runJson<{reconstructionLpips: number}>(['eval-reverse', '--model', r.biflow, '--data', data, '--limit', '16', '--num-exact', '1', '--lpips', heads, '--vgg', vgg, '--json'])
    expect(ev.reconstructionLpips).toBeGreaterThan(0)
    expect(runCli(['eval-reverse', '--model', r.biflow, '--data', data, '--lpips', heads]).stderr).toMatch(/--lpips needs --vgg/)

    // Again: the complete runs are reused, not retrained.
    const again = runCli(['demo', '--quick', '--out', out])
    expect(again.code).toBe(0)
    expect(again.stderr).toMatch(/forward: .* is complete, reusing it/)
    expect(again.stderr).toMatch(/biflow: .* is complete, reusing it/)
    expect(again.stdout).toContain('report:')
  }, 1_200_000)
})
