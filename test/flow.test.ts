// The forward flow end to end: import the reference TARFlow fixture, decode its noise exactly
// (guided), evaluate bits/dim, and the other sample formats.
import {existsSync, readFileSync, writeFileSync} from 'node:fs'
import {join} from 'node:path'
import {beforeAll, describe, expect, it} from 'vitest'

import {fixtures, runCli, runJson, tempDir} from './helpers.js'

interface Arr {
  shape: number[]
  data: number[]
}
const ref = JSON.parse(readFileSync(join(fixtures, 'tarflow-reference', 'tiny-cond.json'), 'utf8'))
const pth = join(fixtures, 'tarflow-reference', 'tiny-cond.pth')

function flat(v: unknown): number[] {
  return Array.isArray(v) ? v.flatMap(flat) : [v as number]
}

/** Write a little-endian .npy (float32 '<f4' or int64 '<i8'). */
function writeNpy(path: string, shape: number[], values: number[], dtype: '<f4' | '<i8' = '<f4'): void {
  let header = `{'descr': '${dtype}', 'fortran_order': False, 'shape': (${shape.join(', ')}${shape.length === 1 ? ',' : ''}), }`
  const total = 10 + header.length + 1
  header += ' '.repeat((64 - (total % 64)) % 64) + '\n'
  const pre = Buffer.alloc(10)
  pre.write('\x93NUMPY', 0, 'latin1')
  pre[6] = 1
  pre[7] = 0
  pre.writeUInt16LE(header.length, 8)
  const body =
    dtype === '<f4'
      ? Buffer.from(new Float32Array(values).buffer)
      : Buffer.from(new BigInt64Array(values.map((v) => BigInt(v))).buffer)
  writeFileSync(path, Buffer.concat([pre, Buffer.from(header, 'latin1'), body]))
}

/** Read a float32 .npy: shape and values. */
function readNpyF32(path: string): {shape: number[]; values: Float32Array} {
  const buf = readFileSync(path)
  const len = buf.readUInt16LE(8)
  const header = buf.subarray(10, 10 + len).toString('latin1')
  expect(header).toContain("'descr': '<f4'")
  const shape = (/\(([^)]*)\)/.exec(header)![1] ?? '').split(',').filter((s) => s.trim()).map(Number)
  const data = buf.subarray(10 + len)
  return {shape, values: new Float32Array(data.buffer.slice(data.byteOffset, data.byteOffset + data.byteLength))}
}

function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  expect(a.length).toBe(b.length)
  let m = 0
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]))
  return m
}

describe('forward flow: import, exact sampling, bits/dim', () => {
  const dir = tempDir('biflow-flow-')
  const run = join(dir, 'run')

  beforeAll(() => {
    const r = runJson<{run: string; model: Record<string, number>}>(['import', 'tarflow', pth, '--out', run])
    expect(r.model).toMatchObject({imgSize: 8, inChannels: 3, patchSize: 2, channels: 128, numBlocks: 4, layersPerBlock: 1, numClasses: 3})
  })

  it('writes a run folder and never overwrites one without --force', () => {
    const config = JSON.parse(readFileSync(join(run, 'config.json'), 'utf8'))
    expect(config).toMatchObject({version: 1, kind: 'tarflow', noiseStd: null})
    expect(existsSync(join(run, 'weights.safetensors'))).toBe(true)
    const again = runCli(['import', 'tarflow', pth, '--out', run])
    expect(again.code).not.toBe(0)
    expect(again.stderr).toMatch(/already exists.*--force/s)
    expect(runCli(['import', 'tarflow', pth, '--out', run, '--force']).code).toBe(0)
  })

  it('refuses shapes that contradict --img-size', () => {
    const r = runCli(['import', 'tarflow', pth, '--out', join(dir, 'bad'), '--img-size', '10'])
    expect(r.code).not.toBe(0)
    expect(r.stderr).toMatch(/img-size 10/)
    expect(existsSync(join(dir, 'bad'))).toBe(false)
  })

  it('decodes given noise exactly with annealed guidance, as the reference does', () => {
    const noise = ref.noise_tokens as Arr
    const z = join(dir, 'z.npy')
    writeNpy(z, noise.shape, flat(noise.data))
    const out = join(dir, 'exact')
    const r = runJson<{num: number; files: string[]; denoised: boolean}>([
      'sample', '--model', run, '--method', 'exact', '--noise', z, '--labels', (ref.y as number[]).join(','),
      '--guidance', String(ref.config.guidance), '--annealed', '--format', 'npy', '--out', out,
    ])
    expect(r.num).toBe(4)
    expect(r.denoised).toBe(false) // imported models have no known noise level
    const s = readNpyF32(join(out, 'samples.npy'))
    expect(s.shape).toEqual([4, 3, 8, 8])
    expect(maxAbsDiff(s.values, flat((ref.sample as Arr).data))).toBeLessThanOrEqual(1e-3)
  })

  it('evaluates bits/dim of given images per sample', () => {
    const x = ref.x as Arr
    const xp = join(dir, 'x.npy')
    const yp = join(dir, 'y.npy')
    writeNpy(xp, x.shape, flat(x.data))
    writeNpy(yp, [4], ref.y as number[], '<i8')
    const r = runJson<{bpd: number; perSampleBpd: number[]}>(['eval-bpd', '--model', run, '--input', xp, '--labels', yp, '--per-sample'])
    expect(maxAbsDiff(r.perSampleBpd, ref.bpd as number[])).toBeLessThanOrEqual(1e-4)
    const mean = (ref.bpd as number[]).reduce((a, b) => a + b, 0) / 4
    expect(Math.abs(r.bpd - mean)).toBeLessThanOrEqual(1e-4)
    const plain = runJson<Record<string, unknown>>(['eval-bpd', '--model', run, '--input', xp])
    expect(plain.perSampleBpd).toBeUndefined()
  })

  it('writes png (with a grid) and npz, denoises when asked, and is reproducible by seed', () => {
    const png = join(dir, 'png')
    const r = runJson<{files: string[]; denoised: boolean}>(['sample', '--model', run, '--num', '3', '--seed', '7', '--out', png, '--noise-std', '0.05'])
    expect(r.denoised).toBe(true)
    expect(r.files.map((f) => f.split('/').pop())).toEqual(['000000.png', '000001.png', '000002.png', 'grid.png'])
    expect(readFileSync(join(png, 'grid.png')).subarray(1, 4).toString()).toBe('PNG')
    const a = join(dir, 'npy-a')
    const b = join(dir, 'npy-b')
    runJson(['sample', '--model', run, '--num', '2', '--seed', '3', '--format', 'npy', '--out', a])
    runJson(['sample', '--model', run, '--num', '2', '--seed', '3', '--format', 'npy', '--out', b])
    expect(readFileSync(join(a, 'samples.npy')).equals(readFileSync(join(b, 'samples.npy')))).toBe(true)
    const npz = join(dir, 'npz')
    runJson(['sample', '--model', run, '--num', '2', '--format', 'npz', '--out', npz])
    expect(readFileSync(join(npz, 'samples.npz')).subarray(0, 2).toString()).toBe('PK')
    // never written into a folder that holds files, unless --force
    const before = readFileSync(join(a, 'samples.npy'))
    const again = runCli(['sample', '--model', run, '--num', '2', '--seed', '4', '--format', 'npy', '--out', a])
    expect(again.code).toBe(1)
    expect(again.stderr).toMatch(/exists and is not empty.*--force/)
    expect(readFileSync(join(a, 'samples.npy')).equals(before)).toBe(true)
    runJson(['sample', '--model', run, '--num', '2', '--seed', '4', '--format', 'npy', '--out', a, '--force'])
    expect(readFileSync(join(a, 'samples.npy')).equals(before)).toBe(false)
  })

  it('rejects the reverse method until a distilled model exists, and bad labels', () => {
    const r = runCli(['sample', '--model', run, '--method', 'reverse', '--out', join(dir, 'rev')])
    expect(r.code).not.toBe(0)
    expect(r.stderr).toMatch(/reverse/)
    const l = runCli(['sample', '--model', run, '--labels', '7', '--out', join(dir, 'lab')])
    expect(l.code).not.toBe(0)
    expect(l.stderr).toMatch(/out of range/)
  })
})
