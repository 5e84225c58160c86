// End-to-end tests of `biflow data prepare` and `biflow data inspect` on the tiny inputs in
// fixtures/data (regenerate them with scripts/make-data-fixtures.py).
import {existsSync, readdirSync, readFileSync, statSync, writeFileSync} from 'node:fs'
import {join} from 'node:path'
import {describe, expect, it} from 'vitest'

import type {InspectResult} from '../src/commands/data/inspect.js'
import {fixtures, runCli, runCliInterrupted, runJson, tempDir} from './helpers.js'

const data = (name: string) => join(fixtures, 'data', name)

/** manifest.json: what `data inspect` reports of a dataset, as the file records it. */
interface Manifest extends Pick<InspectResult, 'channels' | 'classes' | 'count' | 'height' | 'version' | 'width'> {
  format: string
  splits: {train: {count: number}; val: {count: number}; seed: number; valFraction: number}
  source: {kind: string; input: string}
  recordBytes: number
  shards: {file: string; count: number}[]
  checksum: {algorithm: string; value: string}
  skipped: {path: string; error: string}[]
}

/** stderr with oclif's line wrapping (" ›   " continuation lines) undone. */
const flat = (s: string) => s.replace(/ *\n\s*›\s*/g, ' ')

const manifest = (dir: string) => JSON.parse(readFileSync(join(dir, 'manifest.json'), 'utf8')) as Manifest

/** Prepare `input` into a fresh folder; returns the folder, the --json result and the manifest. */
function prepare(input: string, ...flags: string[]) {
  const out = join(tempDir(), 'ds')
  const result = runJson<{count: number; classes: number; train: number; val: number; skipped: number; imagesPerSec: number}>([
    'data',
    'prepare',
    input,
    '--out',
    out,
    ...flags,
  ])
  return {out, result, m: manifest(out)}
}

/** A failing prepare: exit code 1, the message on stderr, nothing left at DIR or next to it. */
function prepareFails(input: string, flags: string[], message: RegExp) {
  const parent = tempDir()
  const out = join(parent, 'ds')
  const r = runCli(['data', 'prepare', input, '--out', out, ...flags])
  expect(r.code).toBe(1)
  expect(flat(r.stderr)).toMatch(message)
  expect(existsSync(out)).toBe(false)
  expect(readdirSync(parent)).toEqual([])
  return r
}

describe('data prepare: every input kind', () => {
  it('prepares the built-in MNIST training set and inspects it', () => {
    const {out, result, m} = prepare('builtin:mnist', '--limit', '600', '--val-fraction', '0.1', '--seed', '5')
    expect(result).toMatchObject({count: 600, classes: 10, train: 540, val: 60})
    expect(m).toMatchObject({format: 'biflow-dataset', version: 1, height: 28, width: 28, channels: 1})
    expect(m.source).toMatchObject({kind: 'idx', input: 'builtin:mnist'})
    expect(m.classes.map((c) => c.name)).toEqual(['0', '1', '2', '3', '4', '5', '6', '7', '8', '9'])
    expect(m.classes.reduce((a, c) => a + c.count, 0)).toBe(600)
    expect(m.checksum.value).toMatch(/^[0-9a-f]{64}$/)
    expect(statSync(join(out, m.shards[0].file)).size).toBe(600 * 784)

    const grid = join(tempDir(), 'grid.png')
    const r = runCli(['data', 'inspect', out, '--grid', grid, '--verify'])
    expect(r.code).toBe(0)
    expect(r.stdout).toMatch(/images\s+600 \(train 540, val 60\)/)
    expect(r.stdout).toMatch(/shape\s+1 x 28 x 28/)
    expect(r.stdout).toMatch(/\(verified\)/)
    expect(readFileSync(grid).subarray(1, 4).toString()).toBe('PNG')
  })

  it('inspects an unlabelled dataset as a plain grid, with --json', () => {
    const {out} = prepare(data('folder-flat'))
    const r = runJson<{count: number; classes: unknown[]; grid: string; gridRows: number}>(['data', 'inspect', out, '--per-row', '2'])
    expect(r).toMatchObject({count: 4, classes: [], gridRows: 2})
    expect(r.grid).toBe(join(out, 'preview.png'))
    expect(existsSync(r.grid)).toBe(true)
  })

  it('uses the same val split for the same seed, another for another seed', () => {
    const a = prepare('builtin:mnist', '--limit', '200', '--val-fraction', '0.2', '--seed', '1')
    const b = prepare('builtin:mnist', '--limit', '200', '--val-fraction', '0.2', '--seed', '1')
    const c = prepare('builtin:mnist', '--limit', '200', '--val-fraction', '0.2', '--seed', '2')
    expect(a.m.checksum.value).toBe(b.m.checksum.value)
    expect(a.m.checksum.value).not.toBe(c.m.checksum.value)
    expect(readFileSync(join(a.out, 'val.idx'))).toEqual(readFileSync(join(b.out, 'val.idx')))
  })

  it('reads a labelled image folder with classes in sorted order', () => {
    const {m} = prepare(data('folder-labelled'))
    expect(m).toMatchObject({count: 6, height: 8, width: 8, channels: 3})
    expect(m.source.kind).toBe('folder')
    expect(m.classes).toEqual([
      {name: 'cat', count: 3},
      {name: 'dog', count: 3},
    ])
  })

  it('reads a flat folder as unlabelled and resizes with --size', () => {
    const {m, result} = prepare(data('folder-flat'), '--size', '4', '--channels', '3')
    expect(result.classes).toBe(0)
    expect(m).toMatchObject({count: 4, height: 4, width: 4, channels: 3, classes: []})
  })

  for (const archive of ['labelled.tar', 'labelled.tar.gz', 'labelled.tgz']) {
    it(`streams ${archive}`, () => {
      const {m} = prepare(data(archive))
      expect(m.source.kind).toBe('tar')
      expect(m).toMatchObject({count: 6, height: 8, width: 8, channels: 3})
      expect(m.classes).toEqual([
        {name: 'cat', count: 3},
        {name: 'dog', count: 3},
      ])
    })
  }

  it('reads an .npz of N,H,W,C uint8 images with labels (stored members)', () => {
    const {m} = prepare(data('images-nhwc.npz'))
    expect(m).toMatchObject({count: 5, height: 6, width: 6, channels: 3})
    expect(m.classes.map((c) => c.count)).toEqual([2, 2, 1])
  })

  it('reads an .npz of N,C,H,W images with y labels (deflate members) and --limit', () => {
    const {m} = prepare(data('images-nchw-deflate.npz'), '--limit', '3', '--format', 'npz')
    expect(m).toMatchObject({count: 3, height: 6, width: 6, channels: 3})
    expect(m.source.kind).toBe('npz')
  })

  it('reads MNIST idx folders, gzipped or not', () => {
    const gz = prepare(data('mnist-gz'))
    expect(gz.m).toMatchObject({count: 10, height: 28, channels: 1})
    expect(gz.m.classes).toHaveLength(10)
    const plain = prepare(data('mnist-plain'))
    expect(plain.m).toMatchObject({count: 6, height: 8, channels: 1})
    expect(plain.m.classes.map((c) => c.count)).toEqual([2, 2, 2])
  })

  it('streams progress as JSON lines with --json', () => {
    const out = join(tempDir(), 'ds')
    const r = runCli(['data', 'prepare', data('mnist-gz'), '--out', out, '--json'])
    expect(r.code).toBe(0)
    const events = r.stderr
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l))
    expect(events[0]).toMatchObject({type: 'start', phase: 'prepare', total: 10})
    expect(events.filter((e) => e.type === 'progress').at(-1)).toMatchObject({done: 10, total: 10})
    expect(JSON.parse(r.stdout)).toMatchObject({count: 10, out})
  })
})

describe('data prepare: bad input', () => {
  it('stops at a truncated image, naming it', () => {
    prepareFails(data('bad-image'), [], /truncated\.png.*--skip-bad|--skip-bad/s)
    const r = runCli(['data', 'prepare', data('bad-image'), '--out', join(tempDir(), 'x')])
    expect(flat(r.stderr)).toContain('truncated.png')
  })

  it('skips bad images with --skip-bad and lists them in the manifest', () => {
    const {m, result} = prepare(data('bad-image'), '--skip-bad')
    expect(result).toMatchObject({count: 2, skipped: 1})
    expect(m.skipped).toHaveLength(1)
    expect(m.skipped[0].path).toMatch(/truncated\.png$/)
  })

  it('rejects an empty input', () => {
    prepareFails(data('empty'), [], /no images found/)
  })

  it('rejects images of different sizes without --size, accepts them with it', () => {
    prepareFails(data('mixed-sizes'), [], /different sizes.*--size/)
    expect(prepare(data('mixed-sizes'), '--size', '6').m).toMatchObject({count: 2, height: 6, width: 6})
  })

  it('rejects a colour image after a grey first one unless --channels is given', () => {
    prepareFails(data('mixed-channels'), [], /b\.png is a colour image.*--channels 3/)
    expect(prepare(data('mixed-channels'), '--channels', '1').m).toMatchObject({count: 2, channels: 1})
  })

  it('rejects a truncated tar', () => {
    prepareFails(data('truncated.tar'), [], /truncated/)
  })

  it('rejects an .npz of the wrong dtype or rank', () => {
    prepareFails(data('float.npz'), [], /float32.*uint8/)
    prepareFails(data('rank5.npz'), [], /shape \[2, 1, 4, 4, 3\]/)
  })

  it('rejects an input it cannot classify, and a missing input', () => {
    const file = join(tempDir(), 'notes.txt')
    writeFileSync(file, 'hello')
    prepareFails(file, [], /cannot tell what kind of input/)
    prepareFails(join(tempDir(), 'missing'), [], /does not exist/)
    prepareFails('builtin:cifar', [], /unknown built-in dataset/)
  })

  it('does not overwrite an existing DIR without --force, and keeps it when a forced run fails', () => {
    const {out, m} = prepare(data('folder-flat'))
    const r = runCli(['data', 'prepare', data('folder-labelled'), '--out', out])
    expect(r.code).toBe(1)
    expect(flat(r.stderr)).toMatch(/already exists.*--force/)
    expect(manifest(out)).toEqual(m)

    const failed = runCli(['data', 'prepare', data('mixed-sizes'), '--out', out, '--force'])
    expect(failed.code).toBe(1)
    expect(manifest(out)).toEqual(m)

    const forced = runCli(['data', 'prepare', data('folder-labelled'), '--out', out, '--force'])
    expect(forced.code).toBe(0)
    expect(manifest(out).classes).toHaveLength(2)
  })

  it('stops on Ctrl-C and leaves nothing behind', async () => {
    const parent = tempDir()
    const out = join(parent, 'ds')
    // upscaling all of MNIST to 64x64 takes many seconds: interrupt at the first progress event
    const r = await runCliInterrupted(['data', 'prepare', 'builtin:mnist', '--out', out, '--size', '64'], /prepare: \d+\//)
    expect(r.code).toBe(130)
    expect(r.stderr).toMatch(/cancelled by the user/)
    expect(existsSync(out)).toBe(false)
    expect(readdirSync(parent)).toEqual([])
  })

  it('inspect refuses a folder that is not a dataset', () => {
    const r = runCli(['data', 'inspect', tempDir()])
    expect(r.code).toBe(1)
    expect(flat(r.stderr)).toMatch(/not a biflow dataset/)
  })
})
