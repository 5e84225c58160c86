import {Flags} from '@oclif/core'

import {BiflowCommand} from '../lib/command.js'
import {deviceFlags, deviceOptions} from '../lib/device.js'

interface BpdResult {
  bpd: number
  num: number
  perSampleBpd?: number[]
}

export default class EvalBpd extends BiflowCommand {
  static description =
    'Bits per dimension of data under a run\'s forward flow (datasets get seeded uniform dequantisation; --input arrays are used as they are)'
  static examples = [
    '<%= config.bin %> eval-bpd --model runs/mnist --data data/mnist-test',
    '<%= config.bin %> eval-bpd --model runs/tiny --input x.npy --per-sample --json',
  ]
  static flags = {
    ...deviceFlags,
    model: Flags.string({description: 'the run folder (trained or imported)', required: true}),
    data: Flags.string({description: 'a prepared dataset folder (biflow data prepare)', exactlyOne: ['data', 'input']}),
    input: Flags.string({description: 'float32 images N,C,H,W in [-1,1] (.npy), already dequantised', exactlyOne: ['data', 'input']}),
    labels: Flags.string({description: 'class labels of the --input images (.npy of integers; default: no class)'}),
    'per-sample': Flags.boolean({description: 'also report the bits/dim of every sample'}),
    seed: Flags.integer({description: 'seed of the dequantisation noise', default: 0}),
    'batch-size': Flags.integer({description: 'images evaluated at once', min: 1, default: 64}),
  }

  async run(): Promise<BpdResult> {
    const {flags} = await this.parse(EvalBpd)
    const result = await this.job<BpdResult>('eval-bpd', {
      ...deviceOptions(flags),
      model: flags.model,
      data: flags.data,
      input: flags.input,
      labels: flags.labels,
      perSample: flags['per-sample'],
      seed: flags.seed,
      batchSize: flags['batch-size'],
    })
    this.log(`${result.bpd.toFixed(4)} bits/dim over ${result.num} images`)
    if (result.perSampleBpd && !this.jsonEnabled()) for (const [i, b] of result.perSampleBpd.entries()) this.log(`${i}\t${b.toFixed(4)}`)
    return result
  }
}
