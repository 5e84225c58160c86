import {BiflowCommand} from '../lib/command.js'
import {deviceFlags} from '../lib/device.js'
import {optionFlags} from '../lib/options.js'

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
    ...optionFlags('train', {'debug-nan-at-step': 'given', 'command-line': 'given'}),
  }

  async run(): Promise<TrainResult> {
    const {flags} = await this.parse(Train)

    const result = await this.job<TrainResult>('train', {
      ...this.options('device', flags),
      ...this.options('train', flags),
      commandLine: this.commandLine(),
    })
    const fmt = (v: number | null) => (v === null ? '?' : v.toFixed(4))
    this.log(`trained ${result.run} to step ${result.steps}: loss ${fmt(result.loss)}, ${fmt(result.bpd)} bits/dim, ${result.stepsPerSec.toFixed(2)} steps/s`)
    if (result.lastCheckpoint) this.log(`last checkpoint: ${result.lastCheckpoint}`)
    this.log(`weights (EMA): ${result.weights}; loss curve: ${result.lossPlot}`)
    return result
  }
}
