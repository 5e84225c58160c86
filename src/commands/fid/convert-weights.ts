import {BiflowCommand} from '../../lib/command.js'
import {optionArgs} from '../../lib/options.js'

export default class ConvertWeights extends BiflowCommand {
  static description = `Convert FID Inception weights (.pth, legacy or zip format) to .safetensors, once

The input is pytorch-fid's pt_inception-2015-12-05-6726825d.pth (its SHA-256 is checked when the file
has that name) or any state_dict with the same tensor names. Only tensor-rebuild pickle globals are
accepted; anything else in the pickle is refused.`

  static examples = ['<%= config.bin %> fid convert-weights pt_inception-2015-12-05-6726825d.pth inception.safetensors']

  static args = optionArgs('fid.convertWeights', ['input', 'output'])

  async run(): Promise<{input: string; output: string; tensors: number}> {
    const {args} = await this.parse(ConvertWeights)
    const r = await this.job<{input: string; output: string; tensors: number}>('fid.convertWeights', args)
    this.log(`wrote ${r.tensors} tensors to ${r.output}`)
    return r
  }
}
