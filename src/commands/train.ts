import {Flags} from '@oclif/core'

import {BiflowCommand} from '../lib/command.js'
import {deviceFlags, deviceOptions} from '../lib/device.js'
import {optionFlags, optionValues} from '../lib/options.js'

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
    out: Flags.string({required: true, description: 'run folder to create (or to continue with --resume)'}),
    resume: Flags.boolean({description: 'continue the run in --out from its newest checkpoint'}),
    config: Flags.string({description: 'JSON file with training options (camelCase flag names, or a run\'s config.json); flags override it'}),
    ...optionFlags('train'),
  }

  async run(): Promise<TrainResult> {
    const {flags} = await this.parse(Train)

    const result = await this.job<TrainResult>('train', {
      ...deviceOptions(flags),
      out: flags.out,
      resume: flags.resume || undefined,
      config: flags.config,
      ...optionValues('train', flags, (m) => this.error(m)),
      commandLine: this.commandLine(),
    })
    const fmt = (v: number | null) => (v === null ? '?' : v.toFixed(4))
    this.log(`trained ${result.run} to step ${result.steps}: loss ${fmt(result.loss)}, ${fmt(result.bpd)} bits/dim, ${result.stepsPerSec.toFixed(2)} steps/s`)
    if (result.lastCheckpoint) this.log(`last checkpoint: ${result.lastCheckpoint}`)
    this.log(`weights (EMA): ${result.weights}; loss curve: ${result.lossPlot}`)
    return result
  }
}
