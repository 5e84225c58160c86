import {mkdirSync, readFileSync, writeFileSync} from 'node:fs'
import {join} from 'node:path'
import {beforeAll, describe, expect, it} from 'vitest'

import {fixtures, runCli, runJson, tempDir} from './helpers.js'

const ref = join(fixtures, 'fid-reference')
const FID_AB = 598.7282851342064
// oclif wraps error lines (' ›   ' continuation prefixes): undo that before matching.
const flat = (s: string) => s.replace(/\n ›   /g, '')

describe('biflow eval-fid', () => {
  const dir = tempDir('biflow-fid-')
  const weights = join(dir, 'formula.safetensors')
  // No cached weights may leak in from the machine running the tests.
  const env = {HOME: dir, XDG_CACHE_HOME: join(dir, 'cache'), BIFLOW_INCEPTION_WEIGHTS: ''}

  beforeAll(() => {
    const r = runCli(['fid', 'formula-weights', weights, '--json'])
    expect(r.code, r.stderr).toBe(0)
    expect(JSON.parse(r.stdout).tensors).toBe(472)
  })

  it('reproduces pytorch-fid on the fixture statistics, stored and deflate-compressed', () => {
    const a = runJson<{fid: number}>(['eval-fid', join(ref, 'stats-a.npz'), join(ref, 'stats-b.npz')])
    expect(Math.abs(a.fid - FID_AB) / FID_AB).toBeLessThan(1e-6)
    const b = runJson<{fid: number}>(['eval-fid', join(ref, 'stats-a.npz'), join(ref, 'stats-b-compressed.npz')])
    expect(b.fid).toBe(a.fid)
    const self = runJson<{fid: number}>(['eval-fid', join(ref, 'stats-a.npz'), join(ref, 'stats-a.npz')])
    expect(Math.abs(self.fid)).toBeLessThan(1e-6)
  })

  it('scores an image folder, saves its statistics, and gets ~0 against them', () => {
    const stats = join(dir, 'images-stats.npz')
    const r = runJson<{source: {images: number; kind: string}; savedStats: string; is: number}>([
      'eval-fid', join(ref, 'images'), '--save-stats', stats, '--inception-weights', weights, '--is', '--is-splits', '1',
    ])
    expect(r.source).toMatchObject({kind: 'folder', images: 11})
    expect(r.savedStats).toBe(stats)
    expect(r.is).toBeGreaterThanOrEqual(1)
    const again = runCli(['eval-fid', join(ref, 'images'), stats, '--json'], {env: {...env, BIFLOW_INCEPTION_WEIGHTS: weights}})
    expect(again.code, again.stderr).toBe(0)
    expect(Math.abs(JSON.parse(again.stdout).fid)).toBeLessThan(1e-6)
    // 2048-dimensional statistics against the 256-dimensional fixture: a clear error.
    const bad = runCli(['eval-fid', stats, join(ref, 'stats-a.npz')])
    expect(bad.code).not.toBe(0)
    expect(flat(bad.stderr)).toMatch(/different dimensions/)
  }, 120_000)

  it('scores exact samples of a model run, streaming, and needs --num for it', () => {
    const run = join(dir, 'tiny-run')
    runJson(['import', 'tarflow', join(fixtures, 'tarflow-reference', 'tiny-cond.pth'), '--out', run])
    const stats = join(dir, 'run-stats.npz')
    const r = runJson<{source: {images: number; kind: string}}>([
      'eval-fid', run, '--num', '3', '--seed', '7', '--save-stats', stats, '--inception-weights', weights,
    ])
    expect(r.source).toMatchObject({kind: 'run', images: 3})
    // the same seed draws the same samples: FID ~0 against their own statistics
    const same = runJson<{fid: number}>(['eval-fid', run, stats, '--num', '3', '--seed', '7', '--inception-weights', weights])
    expect(Math.abs(same.fid)).toBeLessThan(1e-6)
    const other = runJson<{fid: number}>(['eval-fid', run, stats, '--num', '3', '--seed', '8', '--inception-weights', weights])
    expect(other.fid).toBeGreaterThan(1e-3)
    const noNum = runCli(['eval-fid', run, stats, '--inception-weights', weights])
    expect(noNum.code).not.toBe(0)
    expect(noNum.stderr).toMatch(/is a model run: give --num N/)
  }, 180_000)

  it('converts weights to safetensors and refuses weights that are not the FID network', () => {
    const out = join(dir, 'converted.safetensors')
    const ok = runJson<{tensors: number}>(['fid', 'convert-weights', weights, out])
    expect(ok.tensors).toBe(472)
    expect(readFileSync(out).length).toBe(readFileSync(weights).length)
    const subset = runCli(['fid', 'convert-weights', join(ref, 'fid-inception-formula-subset.pth'), join(dir, 'x.safetensors')])
    expect(subset.code).not.toBe(0)
    expect(flat(subset.stderr)).toMatch(/has no tensor 'Conv2d_2a_3x3.conv.weight'/)
  })

  it('refuses a .pth whose pickle names a foreign global', () => {
    // Legacy header (magic, protocol 1001, sys info) then {'x': os.system('echo pwned')}.
    const evil = Buffer.concat([
      Buffer.from([0x80, 2, 0x8a, 10, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, 0x2e]),
      Buffer.from([0x80, 2, 0x4d, 0xe9, 0x03, 0x2e, 0x80, 2, 0x7d, 0x2e]),
      Buffer.from([0x80, 2, 0x7d, 0x28, 0x58, 1, 0, 0, 0, 0x78]),
      Buffer.from('cos\nsystem\n', 'latin1'),
      Buffer.from([0x58, 10, 0, 0, 0]),
      Buffer.from('echo pwned', 'latin1'),
      Buffer.from([0x85, 0x52, 0x75, 0x2e]),
    ])
    const path = join(dir, 'evil.pth')
    writeFileSync(path, evil)
    const r = runCli(['eval-fid', join(ref, 'images'), join(ref, 'stats-a.npz'), '--inception-weights', path])
    expect(r.code).not.toBe(0)
    expect(flat(r.stderr)).toMatch(/refusing the pickle global 'os\.system'/)
  })

  it('fails clearly on a truncated weights file, an empty folder, and missing weights', () => {
    const full = readFileSync(join(ref, 'fid-inception-formula-subset.pth'))
    const cut = join(dir, 'truncated.pth')
    writeFileSync(cut, full.subarray(0, full.length - 1000))
    const t = runCli(['fid', 'convert-weights', cut, join(dir, 'y.safetensors')])
    expect(t.code).not.toBe(0)
    expect(flat(t.stderr)).toMatch(/truncated/)

    const empty = join(dir, 'empty')
    mkdirSync(empty)
    const e = runCli(['eval-fid', empty, join(ref, 'stats-a.npz'), '--inception-weights', weights])
    expect(e.code).not.toBe(0)
    expect(flat(e.stderr)).toMatch(/holds no images/)

    const m = runCli(['eval-fid', join(ref, 'images'), join(ref, 'stats-a.npz')], {env})
    expect(m.code).not.toBe(0)
    expect(flat(m.stderr)).toMatch(/pytorch-fid\/releases\/download\/fid_weights\/pt_inception-2015-12-05-6726825d\.pth/)
    expect(flat(m.stderr)).toMatch(/6726825d/)

    const nothing = runCli(['eval-fid', join(ref, 'images')])
    expect(nothing.code).not.toBe(0)
  })
})
