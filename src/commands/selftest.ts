import {BiflowCommand} from '../lib/command.js'
import {optionFlags} from '../lib/options.js'

export default class Selftest extends BiflowCommand {
  static description = 'Check that the native core loads and that jobs, progress, errors and Ctrl-C work'
  static hidden = true
  static flags = optionFlags('echo')

  async run(): Promise<{steps: number}> {
    const {flags} = await this.parse(Selftest)
    const result = await this.job<{steps: number}>('echo', this.options('echo', flags))
    this.log(`counted ${result.steps} steps`)
    return result
  }
}
