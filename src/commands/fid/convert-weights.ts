import {Args} from '@oclif/core'

import {BiflowCommand} from '../../lib/command.js'

export default class ConvertWeights extends BiflowCommand {
  static description = `Convert FID Inception weights (.pth, legacy or zip format) to .safetensors, once

The input is pytorch-fid's pt_inception-2015-12-05-6726825d.pth (its SHA-256 is checked when the file
has that name) or any state_dict with the same tensor names. Only tensor-rebuild pickle globals are
accepted; anything else in the pickle is refused.`

  static examples = ['<%= config.bin %> fid convert-weights pt_inception-2015-12-05-6726825d.pth inception.safetensors']

  static args = {
    input: Args.string({description: 'weights to read (.pth, legacy or zip format, or .safetensors)', required: true}),
    output: Args.string({description: '.safetensors file to write', required: true}),
  }

  async run(): Promise<{input: string; output: string; tensors: number}> {
    const {args} = await this.parse(ConvertWeights)
    const r = await this.job<{input: string; output: string; tensors: number}>('fid.convertWeights', {
      input: args.input,
      output: args.output,
    })
    this.log(`wrote ${r.tensors} tensors to ${r.output}`)
    return r
  }
}
