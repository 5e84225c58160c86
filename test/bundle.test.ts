// Model bundles: export -> import round trip gives identical samples (a distilled run carries its F);
// every malicious or unexpected archive entry is refused with nothing written.
import {existsSync, mkdirSync, readFileSync, readdirSync, writeFileSync} from 'node:fs'
import {join} from 'node:path'
import {gzipSync} from 'node:zlib'
import {beforeAll, describe, expect, it} from 'vitest'

import {runCli, runJson, tempDir, toyDataset} from './helpers.js'

let work: string
let data: string
let f: string
let g: string

beforeAll(async () => {
  work = tempDir('biflow-bundle-')
  data = await toyDataset(work)
  f = join(work, 'f')
  g = join(work, 'g')
  runJson(['train', '--data', data, '--out', f, '--patch-size', '2', '--channels', '64', '--blocks', '2', '--layers-per-block', '1', '--batch-size', '8', '--steps', '6', '--clip-scale', '3'])
  runJson(['distill', '--forward', f, '--data', data, '--out', g, '--batch-size', '8', '--steps', '6', '--sample-every', '3'])
})

/** A .tar.gz built by hand: each entry is a path, a type flag ('0' file, '2' symlink, '1' hard link, '5' folder) and content. */
function tarGz(entries: {name: string; type?: string; body?: string; link?: string}[]): Buffer {
  const blocks: Buffer[] = []
  for (const e of entries) {
    const body = Buffer.from(e.body ?? '')
    const h = Buffer.alloc(512)
    h.write(e.name, 0, 100, 'utf8')
    h.write('0000644\0', 100)
    h.write('0000000\0', 108)
    h.write('0000000\0', 116)
    h.write(body.length.toString(8).padStart(11, '0') + '\0', 124)
    h.write('00000000000\0', 136)
    h.write('        ', 148)
    h.write(e.type ?? '0', 156)
    if (e.link) h.write(e.link, 157, 100, 'utf8')
    h.write('ustar\0', 257)
    h.write('00', 263)
    let sum = 0
    for (const b of h) sum += b
    h.write(sum.toString(8).padStart(6, '0') + '\0 ', 148)
    blocks.push(h, body, Buffer.alloc((512 - (body.length % 512)) % 512))
  }
  blocks.push(Buffer.alloc(1024))
  return gzipSync(Buffer.concat(blocks))
}

describe('biflow export / import bundle', () => {
  it('round-trips a distilled run (with its forward flow) to identical samples', () => {
    const bundle = join(work, 'g.tar.gz')
    const ex = runJson<{files: string[]; kind: string}>(['export', g, '--out', bundle])
    expect(ex.kind).toBe('distilled')
    expect(ex.files.sort()).toEqual(['README.md', 'bundle.json', 'config.json', 'forward/config.json', 'forward/weights.safetensors', 'preview.png', 'weights.safetensors'])
    // No overwrite without --force.
    expect(runCli(['export', g, '--out', bundle]).code).toBe(1)

    const out = join(work, 'imported')
    const im = runJson<{run: string; kind: string}>(['import', 'bundle', bundle, '--out', out])
    expect(im.kind).toBe('distilled')
    const cfg = JSON.parse(readFileSync(join(out, 'config.json'), 'utf8'))
    expect(cfg.forward.dir).toBe('forward')
    expect(readFileSync(join(out, 'README.md'), 'utf8')).toMatch(/Provenance[\s\S]*forward run/)
    for (const method of ['reverse', 'exact']) {
      const a = runJson<{files: string[]}>(['sample', '--model', g, '--method', method, '--num', '4', '--seed', '5', '--format', 'npy', '--out', join(work, `a-${method}`)])
      const b = runJson<{files: string[]}>(['sample', '--model', out, '--method', method, '--num', '4', '--seed', '5', '--format', 'npy', '--out', join(work, `b-${method}`)])
      expect(readFileSync(b.files.find((p) => p.endsWith('samples.npy'))!).equals(readFileSync(a.files.find((p) => p.endsWith('samples.npy'))!))).toBe(true)
    }

    // An existing run folder is replaced only with --force.
    const again = runCli(['import', 'bundle', bundle, '--out', out])
    expect(again.code).toBe(1)
    expect(again.stderr).toContain('--force')
    expect(runCli(['import', 'bundle', bundle, '--out', out, '--force']).code).toBe(0)
    expect(runJson<{runs: {kind: string; status: string}[]}>(['runs', out]).runs[0]).toMatchObject({kind: 'distilled', status: 'complete'})
  })

  it('refuses every malicious or unexpected entry and writes nothing', () => {
    const good = {name: 'config.json', body: '{}'}
    const cases: [string, {name: string; type?: string; body?: string; link?: string}[], RegExp][] = [
      ['absolute', [good, {name: '/tmp/evil.txt', body: 'x'}], /absolute path/],
      ['dotdot', [good, {name: '../evil.txt', body: 'x'}], /leaving the bundle/],
      ['dotdot-inner', [good, {name: 'forward/../../evil.txt', body: 'x'}], /leaving the bundle/],
      ['symlink', [good, {name: 'weights.safetensors', type: '2', link: '/etc/passwd'}], /SymbolicLink/],
      ['hardlink', [good, {name: 'weights.safetensors', type: '1', link: 'config.json'}], /Link/],
      ['unexpected', [good, {name: 'run.sh', body: 'rm -rf ~'}], /unexpected file/],
      ['folder', [good, {name: 'checkpoints/', type: '5'}], /unexpected folder/],
      ['duplicate', [good, {name: 'config.json', body: '{"a":1}'}], /appears twice/],
      ['fifo', [good, {name: 'preview.png', type: '6'}], /FIFO/],
    ]
    for (const [name, entries, why] of cases) {
      const file = join(work, `evil-${name}.tar.gz`)
      writeFileSync(file, tarGz(entries))
      const out = join(work, 'evil', name)
      const r = runCli(['import', 'bundle', file, '--out', out])
      expect(r.code, name).toBe(1)
      expect(r.stderr, name).toMatch(why)
      expect(existsSync(out), name).toBe(false)
      expect(existsSync('/tmp/evil.txt')).toBe(false)
      expect(existsSync(join(work, 'evil.txt'))).toBe(false)
    }

    // Well-formed entries whose content does not match bundle.json's checksums: refused after
    // unpacking into a temporary folder, which is removed; --out is never created.
    const bundle = join(work, 'g2.tar.gz')
    runJson(['export', g, '--out', bundle, '--no-preview'])
    const dir = join(work, 'tampered')
    mkdirSync(dir)
    const files = {'bundle.json': JSON.stringify({format: 'biflow-bundle', version: 1, kind: 'distilled', files: {'config.json': '0'.repeat(64)}}), 'config.json': readFileSync(join(g, 'config.json'), 'utf8')}
    const file = join(work, 'evil-checksum.tar.gz')
    writeFileSync(file, tarGz(Object.entries(files).map(([name, body]) => ({name, body}))))
    const r = runCli(['import', 'bundle', file, '--out', join(dir, 'out')])
    expect(r.code).toBe(1)
    expect(r.stderr).toMatch(/checksum/)
    expect(readdirSync(dir)).toEqual([])
  })
})
