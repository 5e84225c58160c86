import {Flags} from '@oclif/core'

import {BiflowCommand} from '../lib/command.js'

export default class Selftest extends BiflowCommand {
  static description = 'Check that the native core loads and that jobs, progress, errors and Ctrl-C work'
  static hidden = true
  static flags = {
    steps: Flags.integer({default: 20, description: 'number of steps to count'}),
    'sleep-ms': Flags.integer({default: 10, description: 'milliseconds per step'}),
    fail: Flags.string({description: 'make the job fail with this message'}),
    panic: Flags.boolean({description: 'make the job panic (the panic must become an error)'}),
  }

  async run(): Promise<{steps: number}> {
    const {flags} = await this.parse(Selftest)
    const result = await this.job<{steps: number}>('echo', {
      steps: flags.steps,
      sleepMs: flags['sleep-ms'],
      fail: flags.fail,
      panic: flags.panic,
    })
    this.log(`counted ${result.steps} steps`)
    return result
  }
}
