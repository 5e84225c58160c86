// Shared helpers of the CLI end-to-end tests: run the built CLI, make temp folders.
import {spawn, spawnSync} from 'node:child_process'
import {mkdtempSync, writeFileSync} from 'node:fs'
import {tmpdir} from 'node:os'
import {dirname, join} from 'node:path'
import {fileURLToPath} from 'node:url'

import {native} from '../src/lib/native.js'

export const root = join(dirname(fileURLToPath(import.meta.url)), '..')
export const fixtures = join(root, 'fixtures')
const bin = join(root, 'bin', 'run.js')

export interface CliResult {
  code: number | null
  stdout: string
  stderr: string
}

/** Run `biflow ...args` to completion (the built CLI: dist/ and native/). */
export function runCli(args: string[], options: {env?: Record<string, string>; cwd?: string} = {}): CliResult {
  const r = spawnSync(process.execPath, [bin, ...args], {
    cwd: options.cwd ?? root,
    env: {...process.env, ...options.env},
    encoding: 'utf8',
    maxBuffer: 64 * 1024 * 1024,
  })
  return {code: r.status, stdout: r.stdout, stderr: r.stderr}
}

/** Run `biflow ...args` with --json and parse the result object from stdout. */
export function runJson<T = Record<string, unknown>>(args: string[]): T {
  const r = runCli([...args, '--json'])
  if (r.code !== 0) throw new Error(`biflow ${args.join(' ')} exited ${r.code}: ${r.stderr}${r.stdout}`)
  return JSON.parse(r.stdout) as T
}

/** Start `biflow ...args` and send it SIGINT once `trigger` appears on stderr. */
export function runCliInterrupted(args: string[], trigger: RegExp): Promise<CliResult> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [bin, ...args], {cwd: root, env: process.env})
    let stdout = ''
    let stderr = ''
    let sent = false
    child.stdout.on('data', (d) => (stdout += d))
    child.stderr.on('data', (d) => {
      stderr += d
      if (!sent && trigger.test(stderr)) {
        sent = true
        child.kill('SIGINT')
      }
    })
    child.on('close', (code) => resolve({code, stdout, stderr}))
  })
}

export function tempDir(prefix = 'biflow-test-'): string {
  return mkdtempSync(join(tmpdir(), prefix))
}

/** A grey PNG of size x size whose pixels are `value(x, y)` (0..255), written with the CLI-free encoder below. */
export function writeGreyPng(path: string, size: number, value: (x: number, y: number) => number): void {
  // Uncompressed zlib (stored blocks) inside a minimal PNG: IHDR, one IDAT, IEND.
  const crcTable = Array.from({length: 256}, (_, n) => {
    let c = n
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1
    return c >>> 0
  })
  const crc = (b: Buffer) => {
    let c = 0xffffffff
    for (const x of b) c = crcTable[(c ^ x) & 0xff] ^ (c >>> 8)
    return (c ^ 0xffffffff) >>> 0
  }
  const chunk = (type: string, body: Buffer) => {
    const len = Buffer.alloc(4)
    len.writeUInt32BE(body.length)
    const tb = Buffer.concat([Buffer.from(type, 'latin1'), body])
    const c = Buffer.alloc(4)
    c.writeUInt32BE(crc(tb))
    return Buffer.concat([len, tb, c])
  }
  const raw = Buffer.alloc(size * (size + 1))
  for (let y = 0; y < size; y++) for (let x = 0; x < size; x++) raw[y * (size + 1) + 1 + x] = value(x, y)
  const stored = Buffer.concat([Buffer.from([1, raw.length & 0xff, raw.length >> 8, ~raw.length & 0xff, (~raw.length >> 8) & 0xff]), raw])
  let a = 1
  let b = 0
  for (const x of raw) {
    a = (a + x) % 65521
    b = (b + a) % 65521
  }
  const adler = Buffer.alloc(4)
  adler.writeUInt32BE(((b << 16) | a) >>> 0)
  const ihdr = Buffer.alloc(13)
  ihdr.writeUInt32BE(size, 0)
  ihdr.writeUInt32BE(size, 4)
  ihdr[8] = 8 // bit depth
  ihdr[9] = 0 // grey
  writeFileSync(
    path,
    Buffer.concat([
      Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
      chunk('IHDR', ihdr),
      chunk('IDAT', Buffer.concat([Buffer.from([0x78, 0x01]), stored, adler])),
      chunk('IEND', Buffer.alloc(0)),
    ]),
  )
}

/** The small dataset the trainer tests share, prepared under `work`: 48 synthetic 8x8 images of 2 classes. Returns its folder. */
export async function toyDataset(work: string): Promise<string> {
  const [pngs, data] = [join(work, 'pngs'), join(work, 'data')]
  await native().runJob('data.synth', JSON.stringify({out: pngs, count: 48, size: 8, classes: 2, seed: 1}))
  await native().runJob('data.prepare', JSON.stringify({input: pngs, out: data}))
  return data
}
