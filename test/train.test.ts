import {spawn} from 'node:child_process'
import {existsSync, readFileSync, readdirSync, writeFileSync} from 'node:fs'
import {join} from 'node:path'
import {beforeAll, describe, expect, it} from 'vitest'

import {root, runCli, runCliInterrupted, runJson, tempDir, toyDataset} from './helpers.js'

// A tiny model on a tiny prepared dataset (8x8 synthetic PNGs, 2 classes): every run takes seconds.
const model = ['--patch-size', '2', '--channels', '64', '--blocks', '2', '--layers-per-block', '1', '--batch-size', '8']

interface TrainResult {
  run: string
  steps: number
  resumedFrom: number | null
  loss: number
  bpd: number
  lastCheckpoint: string
  weights: string
  stepsPerSec: number
}

let data: string
let work: string

beforeAll(async () => {
  work = tempDir('biflow-train-')
  data = await toyDataset(work)
})

const checkpoints = (run: string) => readdirSync(join(run, 'checkpoints')).filter((d) => d.startsWith('step-')).sort()

describe('biflow train', () => {
  it('trains a few steps and reports the result as JSON', () => {
    const out = join(work, 'a')
    const r = runJson<TrainResult>(['train', '--data', data, '--out', out, ...model, '--steps', '12', '--save-every', '5', '--keep', '2'])
    expect(r.steps).toBe(12)
    expect(Number.isFinite(r.loss) && Number.isFinite(r.bpd)).toBe(true)
    expect(r.lastCheckpoint).toBe(join(out, 'checkpoints', 'step-00000012'))
    expect(checkpoints(out)).toEqual(['step-00000010', 'step-00000012'])
    const lines = readFileSync(join(out, 'metrics.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l))
    expect(lines.map((l) => l.step)).toEqual([...Array(12).keys()].map((i) => i + 1))
    expect(existsSync(join(out, 'loss.png')) && existsSync(join(out, 'weights.safetensors'))).toBe(true)
    const cfg = JSON.parse(readFileSync(join(out, 'config.json'), 'utf8'))
    expect(cfg).toMatchObject({version: 1, kind: 'tarflow', noiseStd: 0.05, dequantize: false})
    expect(cfg.model).toMatchObject({imgSize: 8, inChannels: 3, patchSize: 2, channels: 64, numBlocks: 2, numClasses: 2})
    expect(cfg.train).toMatchObject({batchSize: 8, steps: 12, dropLabel: 0.1})
  })

  it('writes a checkpoint on Ctrl-C, then --resume continues to the end', async () => {
    const out = join(work, 'b')
    const r = await runCliInterrupted(
      ['train', '--data', data, '--out', out, ...model, '--steps', '100000', '--save-every', '100000', '--json'],
      /"step":[3-9]/,
    )
    expect(r.code).toBe(130)
    const cks = checkpoints(out)
    expect(cks).toHaveLength(1)
    expect(r.stderr).toContain(`checkpoint written to ${join(out, 'checkpoints', cks[0])}`)
    const stopped = Number(cks[0].slice(5))
    expect(stopped).toBeGreaterThan(0)
    const done = runJson<TrainResult>(['train', '--out', out, '--resume', '--steps', String(stopped + 3)])
    expect(done.resumedFrom).toBe(stopped)
    expect(done.steps).toBe(stopped + 3)
  })

  it('resumes from the last checkpoint after SIGKILL', async () => {
    const out = join(work, 'k')
    const args = ['train', '--data', data, '--out', out, ...model, '--steps', '100000', '--save-every', '2', '--json']
    await new Promise<void>((resolve) => {
      const child = spawn(process.execPath, [join(root, 'bin', 'run.js'), ...args], {cwd: root})
      let err = ''
      child.stderr.on('data', (d) => {
        err += d
        if (/"step":(7|8|9|\d\d)/.test(err)) child.kill('SIGKILL')
      })
      child.on('close', () => resolve())
    })
    const cks = checkpoints(out)
    expect(cks.length).toBeGreaterThan(0)
    const last = Number(cks.at(-1)!.slice(5))
    const done = runJson<TrainResult>(['train', '--out', out, '--resume', '--steps', String(last + 2)])
    expect(done.resumedFrom).toBe(last)
    expect(done.steps).toBe(last + 2)
    const steps = readFileSync(join(out, 'metrics.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l).step)
    expect(steps).toEqual([...Array(last + 2).keys()].map((i) => i + 1))
  })

  it('refuses a corrupted checkpoint and a mismatched --resume with clear errors', () => {
    const out = join(work, 'c')
    runJson(['train', '--data', data, '--out', out, ...model, '--steps', '4'])
    let r = runCli(['train', '--out', out, '--resume', '--steps', '8', '--channels', '128'])
    expect(r.code).toBe(1)
    expect(r.stderr).toMatch(/do not match the run.*channels/s)
    const file = join(out, 'checkpoints', 'step-00000004', 'model.safetensors')
    const bytes = readFileSync(file)
    bytes[bytes.length - 3] ^= 0xff
    writeFileSync(file, bytes)
    r = runCli(['train', '--out', out, '--resume', '--steps', '8'])
    expect(r.code).toBe(1)
    expect(r.stderr).toMatch(/corrupted or truncated: model\.safetensors/)
    r = runCli(['train', '--data', data, '--out', out, ...model, '--steps', '4'])
    expect(r.code).toBe(1)
    expect(r.stderr).toMatch(/already holds a biflow run/)
  })

  it('takes options from --config, flags overriding', () => {
    const out = join(work, 'd')
    const cfgFile = join(work, 'train.json')
    writeFileSync(cfgFile, JSON.stringify({patchSize: 2, channels: 64, blocks: 1, layersPerBlock: 1, batchSize: 4, steps: 50, dequantize: true}))
    const r = runJson<TrainResult>(['train', '--data', data, '--out', out, '--config', cfgFile, '--steps', '3'])
    expect(r.steps).toBe(3)
    const cfg = JSON.parse(readFileSync(join(out, 'config.json'), 'utf8'))
    expect(cfg).toMatchObject({noiseStd: null, dequantize: true, model: {numBlocks: 1}, train: {batchSize: 4, steps: 3}})
    writeFileSync(cfgFile, JSON.stringify({channel: 64}))
    const bad = runCli(['train', '--data', data, '--out', join(work, 'e'), '--config', cfgFile])
    expect(bad.code).toBe(1)
    expect(bad.stderr).toMatch(/invalid training settings/)
  })
})
