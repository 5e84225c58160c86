import {BiflowCommand} from '../../lib/command.js'
import {optionArgs} from '../../lib/options.js'

export default class FormulaWeights extends BiflowCommand {
  static description = `Write the deterministic stand-in FID Inception weights of the parity fixture (.safetensors)

Every value comes from the formula of fixtures/fid-reference/README.md; pytorch-fid fed the same weights
reproduces the fixture's features. For tests and benchmarks only: these are NOT the real FID weights.`

  static examples = ['<%= config.bin %> fid formula-weights /tmp/formula.safetensors']
  static hidden = true

  static args = optionArgs('fid.formulaWeights', ['output'])

  async run(): Promise<{output: string; tensors: number}> {
    const {args} = await this.parse(FormulaWeights)
    const r = await this.job<{output: string; tensors: number}>('fid.formulaWeights', args)
    this.log(`wrote ${r.tensors} tensors to ${r.output}`)
    return r
  }
}
