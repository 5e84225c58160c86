// `biflow runs` on complete, interrupted, failed and running runs, and one writer per run.
import {spawn} from 'node:child_process'
import {existsSync, readFileSync} from 'node:fs'
import {join} from 'node:path'
import {beforeAll, describe, expect, it} from 'vitest'

import type {RunInfo} from '../src/commands/runs.js'
import {native} from '../src/lib/native.js'
import {root, runCli, runCliInterrupted, runJson, tempDir, toyDataset} from './helpers.js'

const model = ['--patch-size', '2', '--channels', '64', '--blocks', '2', '--layers-per-block', '1', '--batch-size', '8']

let data: string
let work: string

beforeAll(async () => {
  work = tempDir('biflow-runs-')
  data = await toyDataset(work)
})

const listing = (dir: string) => runJson<{runs: RunInfo[]}>(['runs', dir]).runs
const find = (runs: RunInfo[], name: string) => runs.find((r) => r.dir.endsWith(`/${name}`))!

describe('biflow runs and the run lock', () => {
  it('lists complete, interrupted, failed and running runs', async () => {
    const runs = join(work, 'runs')
    runJson(['train', '--data', data, '--out', join(runs, 'complete'), ...model, '--steps', '6', '--save-every', '3'])
    const stopped = await runCliInterrupted(
      ['train', '--data', data, '--out', join(runs, 'interrupted'), ...model, '--steps', '100000', '--save-every', '100000', '--json'],
      /"step":[3-9]/,
    )
    expect(stopped.code).toBe(130)
    // A run whose loss became NaN (the trainer's testing hook, through the core directly).
    const tiny = {patchSize: 2, channels: 64, blocks: 2, layersPerBlock: 1, batchSize: 8}
    await expect(
      native().runJob('train', JSON.stringify({data, out: join(runs, 'failed'), ...tiny, steps: 20, saveEvery: 2, debugNanAtStep: 5})),
    ).rejects.toThrow(/NaN/)

    // A running trainer: listed as running with its pid while it holds the lock.
    const child = spawn(process.execPath, [join(root, 'bin', 'run.js'), 'train', '--data', data, '--out', join(runs, 'running'), ...model, '--steps', '100000', '--json'], {cwd: root})
    let stderr = ''
    await new Promise<void>((resolve) => {
      child.stderr.on('data', (d) => {
        stderr += d
        if (/"step":2/.test(stderr)) resolve()
      })
    })
    try {
      const all = listing(runs)
      expect(all.map((r) => r.dir.split('/').pop()).sort()).toEqual(['complete', 'failed', 'interrupted', 'running'])
      expect(find(all, 'complete')).toMatchObject({kind: 'forward', status: 'complete', steps: 6, totalSteps: 6, canResume: false})
      expect(find(all, 'complete').bestBpd).toBeGreaterThan(0)
      expect(find(all, 'complete').lastCheckpoint).toMatch(/step-00000006$/)
      expect(find(all, 'interrupted')).toMatchObject({status: 'interrupted', canResume: true})
      expect(find(all, 'failed').status).toBe('failed')
      expect(find(all, 'failed').error).toMatch(/NaN/)
      expect(find(all, 'running')).toMatchObject({status: 'running', canResume: false, lockedBy: {pid: child.pid}})

      // A second writer on the locked run is refused, naming the pid; nothing of the run changes.
      const config = readFileSync(join(runs, 'running', 'config.json'), 'utf8')
      const second = runCli(['train', '--out', join(runs, 'running'), '--resume', '--steps', '200000'])
      expect(second.code).toBe(1)
      expect(second.stderr).toContain(`pid ${child.pid}`)
      expect(readFileSync(join(runs, 'running', 'config.json'), 'utf8')).toBe(config)
      // Readers never need the lock.
      const text = runCli(['runs', runs])
      expect(text.code).toBe(0)
      expect(text.stdout).toMatch(/running \(pid \d+\)/)
    } finally {
      child.kill('SIGKILL')
      await new Promise((r) => child.on('close', r))
    }

    // Killed without a word: its lock is stale, the run shows as interrupted, and a new writer takes it over.
    expect(existsSync(join(runs, 'running', 'lock.json'))).toBe(true)
    expect(find(listing(runs), 'running').status).toBe('interrupted')
    const resumed = runCli(['train', '--out', join(runs, 'running'), '--resume', '--steps', '4'])
    expect(resumed.stderr + resumed.stdout).toMatch(/stale lock|no checkpoint|already at step/)
  })
})
