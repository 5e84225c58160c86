import {BiflowCommand} from '../lib/command.js'
import {optionFlags} from '../lib/options.js'
import {deviceFlags} from '../lib/device.js'

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
    ...optionFlags('eval-bpd', {data: {exactlyOne: ['data', 'input']}, input: {exactlyOne: ['data', 'input']}}),
  }

  async run(): Promise<BpdResult> {
    const {flags} = await this.parse(EvalBpd)
    const result = await this.job<BpdResult>('eval-bpd', {...this.options('device', flags), ...this.options('eval-bpd', flags)})
    this.log(`${result.bpd.toFixed(4)} bits/dim over ${result.num} images`)
    if (result.perSampleBpd && !this.jsonEnabled()) for (const [i, b] of result.perSampleBpd.entries()) this.log(`${i}\t${b.toFixed(4)}`)
    return result
  }
}
