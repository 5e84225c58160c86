import {Flags} from '@oclif/core'

import {BiflowCommand} from '../lib/command.js'
import {deviceFlags, deviceOptions} from '../lib/device.js'

interface DistillResult {
  run: string
  forward: string
  steps: number
  resumedFrom: number | null
  loss: number | null
  align?: number
  recon?: number
  lastCheckpoint: string | null
  weights: string
  lossPlot: string
  stepsPerSec: number
  imagesPerSec: number
  seconds: number
  parameters: number
}

export default class Distill extends BiflowCommand {
  static description = `Distill BiFlow's learned reverse model G from a trained forward flow F.

F stays frozen: each step noises real images (x~ = x + sigma*eps, sigma = F's training noise), runs F once
in parallel to get its trajectory x^1..x^B = z, and trains G (a bidirectional transformer, one stage per
block of F) to map z back to the CLEAN image in one evaluation. The default loss is BiFlow's hidden
alignment: a head after each stage is aligned with the forward state it mirrors (targets at unit RMS),
plus reconstruction, each term adaptively weighted. With classes, G also learns training-time guidance:
it takes the scale w as an input (drawn per sample from --cfg-range as lo + (hi-lo)*u^3), so that
\`sample --guidance W\` is still ONE evaluation.

RUN2 records F's location and weights checksum (a moved or changed F is an error later), plus the same
files as a training run: checkpoints, EMA weights, metrics.jsonl, loss.png; Ctrl-C and --resume work the
same way. Ablations of the paper: --loss naive|hidden, --align-norm none, --denoise none.`

  static examples = [
    '<%= config.bin %> distill --forward runs/mnist --data data/mnist --out runs/mnist-g --steps 2000',
    '<%= config.bin %> distill --forward runs/mnist --data data/mnist --out runs/naive --loss naive',
    '<%= config.bin %> distill --forward runs/afhq --data data/afhq64 --out runs/afhq-g --noise-std 0.07 --cfg-range 0,4',
    '<%= config.bin %> distill --out runs/mnist-g --resume',
  ]

  static flags = {
    ...deviceFlags,
    forward: Flags.string({description: 'the forward run F (from `biflow train` or `biflow import tarflow`)'}),
    data: Flags.string({description: "prepared dataset folder with F's image size and classes; on --resume defaults to the run's"}),
    out: Flags.string({required: true, description: 'run folder to create (or to continue with --resume)'}),
    resume: Flags.boolean({description: 'continue the distilled run in --out from its newest checkpoint'}),
    'batch-size': Flags.integer({description: 'images per step [default: 64]'}),
    steps: Flags.integer({description: 'total optimiser steps [default: 2000]'}),
    lr: Flags.string({description: 'peak learning rate [default: 1e-3]'}),
    'min-lr': Flags.string({description: 'learning rate at the end of the cosine decay; equal to --lr: constant after warmup [default: --lr]'}),
    warmup: Flags.integer({description: 'linear warmup steps [default: min(100, steps/10)]'}),
    'weight-decay': Flags.string({description: 'AdamW weight decay on weight matrices [default: 1e-4]'}),
    'grad-clip': Flags.string({description: 'clip the global gradient norm to this (0: off) [default: 1]'}),
    'ema-decay': Flags.string({description: 'decay of the EMA of the weights [default: 0.999]'}),
    seed: Flags.integer({description: 'seed for G, data order, noise, label drops and guidance scales [default: 0]'}),
    'noise-std': Flags.string({description: "sigma of the training pairs [default: F's training noise; required for imported F]"}),
    channels: Flags.integer({description: "G's width, a multiple of 64 [default: F's]"}),
    'layers-per-stage': Flags.integer({description: 'transformer layers per stage (one stage per block of F) [default: 1]'}),
    'denoise-layers': Flags.integer({description: 'layers of the learned-denoising block [default: 1]'}),
    loss: Flags.string({description: 'align: hidden alignment + reconstruction; naive: reconstruction only; hidden: G\'s own states held to F\'s [default: align]', options: ['align', 'naive', 'hidden']}),
    'align-norm': Flags.string({description: 'reverse-side norm control of the alignment targets [default: rms]', options: ['rms', 'none']}),
    denoise: Flags.string({description: "learned: G outputs the clean image; none: G outputs x~ and sampling applies F's score step [default: learned]", options: ['learned', 'none']}),
    'adaptive-p': Flags.string({description: 'adaptive weighting D / sg((D + eps)^p) of each term (0: off) [default: 1]'}),
    'adaptive-eps': Flags.string({description: 'eps of the adaptive weighting [default: 0.01]'}),
    'cfg-range': Flags.string({description: 'lo,hi: range of the training-time guidance scales [default: 0,3 with classes]'}),
    'drop-label': Flags.string({description: 'probability of dropping the label [default: 0.1 with classes]'}),
    'save-every': Flags.integer({description: 'write a checkpoint every N steps [default: 500]'}),
    keep: Flags.integer({description: 'number of newest checkpoints to keep [default: 3]'}),
    limit: Flags.integer({description: 'distill on the first N training images only'}),
    'sample-every': Flags.integer({description: "write a grid of 16 one-evaluation samples of G (fixed noise and labels, EMA weights) to RUN2/samples/step-N.png every N steps (0: never) [default: 0]", min: 0}),
  }

  async run(): Promise<DistillResult> {
    const {flags} = await this.parse(Distill)
    const num = (name: string, v: string | undefined) => this.number(name, v)
    let cfgRange: number[] | undefined
    if (flags['cfg-range'] !== undefined) {
      cfgRange = flags['cfg-range'].split(',').map((s) => num('cfg-range', s) as number)
      if (cfgRange.length !== 2) this.error(`--cfg-range must be lo,hi (two numbers), got '${flags['cfg-range']}'`)
    }

    const result = await this.job<DistillResult>('distill', {
      ...deviceOptions(flags),
      forward: flags.forward,
      data: flags.data,
      out: flags.out,
      resume: flags.resume || undefined,
      batchSize: flags['batch-size'],
      steps: flags.steps,
      lr: num('lr', flags.lr),
      minLr: num('min-lr', flags['min-lr']),
      warmup: flags.warmup,
      weightDecay: num('weight-decay', flags['weight-decay']),
      gradClip: num('grad-clip', flags['grad-clip']),
      emaDecay: num('ema-decay', flags['ema-decay']),
      seed: flags.seed,
      noiseStd: num('noise-std', flags['noise-std']),
      channels: flags.channels,
      layersPerStage: flags['layers-per-stage'],
      denoiseLayers: flags['denoise-layers'],
      loss: flags.loss,
      alignNorm: flags['align-norm'],
      denoise: flags.denoise,
      adaptiveP: num('adaptive-p', flags['adaptive-p']),
      adaptiveEps: num('adaptive-eps', flags['adaptive-eps']),
      cfgRange,
      dropLabel: num('drop-label', flags['drop-label']),
      saveEvery: flags['save-every'],
      keep: flags.keep,
      limit: flags.limit,
      sampleEvery: flags['sample-every'],
      commandLine: this.commandLine(),
    })
    const fmt = (v: number | null | undefined) => (v === null || v === undefined ? '?' : v.toFixed(4))
    this.log(
      `distilled ${result.run} to step ${result.steps}: loss ${fmt(result.loss)}, reconstruction MSE ${fmt(result.recon)}, ${result.stepsPerSec.toFixed(2)} steps/s`,
    )
    this.log(`G (EMA): ${result.weights}; loss curve: ${result.lossPlot}; sample it with: biflow sample --model ${result.run} --out DIR`)
    return result
  }
}
