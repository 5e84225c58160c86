import {BiflowCommand} from '../lib/command.js'
import {deviceFlags} from '../lib/device.js'
import {optionFlags} from '../lib/options.js'

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
    ...optionFlags('distill', {'debug-nan-at-step': 'given', 'command-line': 'given'}),
  }

  async run(): Promise<DistillResult> {
    const {flags} = await this.parse(Distill)
    const result = await this.job<DistillResult>('distill', {
      ...this.options('device', flags),
      ...this.options('distill', flags),
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
