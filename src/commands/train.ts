import {Flags} from '@oclif/core'

import {BiflowCommand} from '../lib/command.js'
import {deviceFlags, deviceOptions} from '../lib/device.js'

interface TrainResult {
  run: string
  steps: number
  resumedFrom: number | null
  loss: number | null
  bpd: number | null
  lastCheckpoint: string | null
  weights: string
  metrics: string
  lossPlot: string
  stepsPerSec: number
  imagesPerSec: number
  seconds: number
  parameters: number
}

export default class Train extends BiflowCommand {
  static description = `Train the forward flow (TARFlow) by maximum likelihood on a prepared dataset.

Writes RUN/config.json, checkpoints every --save-every steps (RUN/checkpoints/step-N, written atomically,
the newest --keep kept), RUN/weights.safetensors (the EMA weights), RUN/metrics.jsonl (every step) and
RUN/loss.png. Ctrl-C writes a checkpoint and stops; --resume continues from the newest checkpoint and, on
CPU with the same thread count, ends with the same weights as an uninterrupted run. Options not given come
from --config FILE.json (same names in camelCase), then the defaults.`

  static examples = [
    '<%= config.bin %> train --data data/mnist --out runs/mnist --steps 2000',
    '<%= config.bin %> train --data data/afhq64 --out runs/afhq --channels 512 --blocks 8 --layers-per-block 1 --batch-size 16 --noise-std 0.05',
    '<%= config.bin %> train --data data/afhq64 --out runs/afhq-gpu --channels 768 --blocks 8 --batch-size 256 --device cuda --precision bf16',
    '<%= config.bin %> train --out runs/mnist --resume',
    '<%= config.bin %> train --data data/mnist --out runs/mnist2 --config train.json --json',
  ]

  static flags = {
    ...deviceFlags,
    data: Flags.string({description: 'prepared dataset folder (from `biflow data prepare`); on --resume defaults to the run\'s'}),
    out: Flags.string({required: true, description: 'run folder to create (or to continue with --resume)'}),
    resume: Flags.boolean({description: 'continue the run in --out from its newest checkpoint'}),
    config: Flags.string({description: 'JSON file with training options (camelCase flag names, or a run\'s config.json); flags override it'}),
    'batch-size': Flags.integer({description: 'images per step [default: 64]'}),
    steps: Flags.integer({description: 'total optimiser steps [default: 10000]', exclusive: ['epochs']}),
    epochs: Flags.string({description: 'train for this many passes over the data instead of --steps'}),
    lr: Flags.string({description: 'peak learning rate [default: 3e-4]'}),
    'min-lr': Flags.string({description: 'learning rate at the end of the cosine decay [default: 1e-6]'}),
    warmup: Flags.integer({description: 'linear warmup steps [default: min(1000, steps/20)]'}),
    'weight-decay': Flags.string({description: 'AdamW weight decay on weight matrices [default: 1e-4]'}),
    'grad-clip': Flags.string({description: 'clip the global gradient norm to this (0: off) [default: 1]'}),
    'ema-decay': Flags.string({description: 'decay of the EMA of the weights [default: 0.999]'}),
    'noise-std': Flags.string({description: 'Gaussian noise added to the data (0: none) [default: 0.05]'}),
    dequantize: Flags.boolean({description: 'uniform dequantisation instead of Gaussian noise (likelihood models)'}),
    'drop-label': Flags.string({description: 'probability of dropping the label, for guidance [default: 0.1 with classes]'}),
    seed: Flags.integer({description: 'seed for initial weights, data order, noise and label drops [default: 0]'}),
    'patch-size': Flags.integer({description: 'patch size p (tokens = (size/p)^2) [default: 4 from 32px, else 2]'}),
    channels: Flags.integer({description: 'transformer width (multiple of 64) [default: 256]'}),
    blocks: Flags.integer({description: 'number of flow blocks [default: 4]'}),
    'layers-per-block': Flags.integer({description: 'transformer layers in each block [default: 2]'}),
    'clip-scale': Flags.string({description: 'soft clip c*tanh(a/c) of the affine scales (BiFlow norm control; 0: off) [default: off]'}),
    'save-every': Flags.integer({description: 'write a checkpoint every N steps [default: 1000]'}),
    keep: Flags.integer({description: 'number of newest checkpoints to keep [default: 3]'}),
    limit: Flags.integer({description: 'train on the first N training images only'}),
    'sample-every': Flags.integer({description: 'write a grid of 16 samples (fixed noise and labels, EMA weights) to RUN/samples/step-N.png every N steps (0: never) [default: 0]', min: 0}),
  }

  async run(): Promise<TrainResult> {
    const {flags} = await this.parse(Train)
    const num = (name: string, v: string | undefined) => this.number(name, v)

    const result = await this.job<TrainResult>('train', {
      ...deviceOptions(flags),
      data: flags.data,
      out: flags.out,
      resume: flags.resume || undefined,
      config: flags.config,
      batchSize: flags['batch-size'],
      steps: flags.steps,
      epochs: num('epochs', flags.epochs),
      lr: num('lr', flags.lr),
      minLr: num('min-lr', flags['min-lr']),
      warmup: flags.warmup,
      weightDecay: num('weight-decay', flags['weight-decay']),
      gradClip: num('grad-clip', flags['grad-clip']),
      emaDecay: num('ema-decay', flags['ema-decay']),
      noiseStd: num('noise-std', flags['noise-std']),
      dequantize: flags.dequantize || undefined,
      dropLabel: num('drop-label', flags['drop-label']),
      seed: flags.seed,
      patchSize: flags['patch-size'],
      channels: flags.channels,
      blocks: flags.blocks,
      layersPerBlock: flags['layers-per-block'],
      clipScale: num('clip-scale', flags['clip-scale']),
      saveEvery: flags['save-every'],
      keep: flags.keep,
      limit: flags.limit,
      sampleEvery: flags['sample-every'],
      commandLine: this.commandLine(),
    })
    const fmt = (v: number | null) => (v === null ? '?' : v.toFixed(4))
    this.log(`trained ${result.run} to step ${result.steps}: loss ${fmt(result.loss)}, ${fmt(result.bpd)} bits/dim, ${result.stepsPerSec.toFixed(2)} steps/s`)
    if (result.lastCheckpoint) this.log(`last checkpoint: ${result.lastCheckpoint}`)
    this.log(`weights (EMA): ${result.weights}; loss curve: ${result.lossPlot}`)
    return result
  }
}
