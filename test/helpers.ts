// Shared helpers of the CLI end-to-end tests: run the built CLI, make temp folders.
import {spawn, spawnSync} from 'node:child_process'
import {mkdtempSync} from 'node:fs'
import {tmpdir} from 'node:os'
import {dirname, join} from 'node:path'
import {fileURLToPath} from 'node:url'

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
