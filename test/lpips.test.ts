import {copyFileSync, mkdirSync} from 'node:fs'
import {join} from 'node:path'

import {beforeAll, describe, expect, it} from 'vitest'

import {native} from '../src/lib/native.js'
import {fixtures, runCli, runJson, tempDir, writeGreyPng} from './helpers.js'

// The real LPIPS heads (fixtures/lpips, from the lpips package) over the parity fixture's formula VGG16:
// the numbers are not perceptual, but the command, its pairing and its errors are the real ones.
describe('biflow lpips', () => {
  const work = tempDir()
  const heads = join(fixtures, 'lpips', 'vgg-lin-v0.1.pth')
  const vgg = join(work, 'vgg.safetensors')
  const weights = ['--lpips', heads, '--vgg', vgg]
  const [a, b] = [join(work, 'a'), join(work, 'b')]

  beforeAll(async () => {
    await native().runJob('lpips.formulaWeights', JSON.stringify({output: vgg}))
    for (const dir of [a, b]) mkdirSync(dir)
    writeGreyPng(join(a, '1.png'), 32, (x, y) => (x * 8 + y) % 256)
    writeGreyPng(join(a, '2.png'), 32, (x) => x * 8)
    copyFileSync(join(a, '1.png'), join(b, '1.png'))
    writeGreyPng(join(b, '2.png'), 32, (_x, y) => y * 8)
  })

  it('measures pairs of files and of folders paired by name', () => {
    const same = runJson<{mean: number; count: number}>(['lpips', join(a, '1.png'), join(b, '1.png'), ...weights, '--json'])
    expect(same).toMatchObject({count: 1, mean: 0})
    const r = runJson<{mean: number; pairs: {a: string; distance: number}[]}>(['lpips', a, b, ...weights, '--json'])
    expect(r.pairs.map((p) => p.a)).toEqual(['1.png', '2.png'])
    expect(r.pairs[0].distance).toBe(0)
    expect(r.pairs[1].distance).toBeGreaterThan(0)
    expect(r.mean).toBeCloseTo(r.pairs[1].distance / 2, 6)
  })

  it('refuses unpaired folders, images of different sizes and wrong weights', () => {
    const c = join(work, 'c')
    mkdirSync(c)
    writeGreyPng(join(c, '1.png'), 32, () => 0)
    writeGreyPng(join(c, '3.png'), 32, () => 0)
    expect(runCli(['lpips', a, c, ...weights]).stderr).toMatch(/paired by file name.*2\.png.*3\.png/s)
    writeGreyPng(join(c, 'small.png'), 16, () => 0)
    expect(runCli(['lpips', join(a, '1.png'), join(c, 'small.png'), ...weights]).stderr).toMatch(/32x32.*16x16|one size/s)
    const wrong = runCli(['lpips', a, b, '--lpips', heads, '--vgg', heads])
    expect(wrong.code).not.toBe(0)
    expect(wrong.stderr).toMatch(/features\.0\.weight/)
    expect(runCli(['lpips', a, b, '--lpips', heads]).stderr).toMatch(/required flag vgg/)
  })
})
