// The base of every biflow command: --json, and core errors turned into one clear line.
import {Command, Errors} from '@oclif/core'

import {JobCancelled, runJob} from './job.js'

export abstract class BiflowCommand extends Command {
  static enableJsonFlag = true

  /** Run a core job, rendering its progress the way this invocation asked for. */
  protected job<T>(name: string, options: object): Promise<T> {
    return runJob<T>(name, options, {json: this.jsonEnabled()})
  }

  /** Errors from the core are user-facing sentences: print them without a stack (DEBUG=1 keeps it). */
  protected async catch(error: Error & {exitCode?: number}): Promise<unknown> {
    if (error instanceof Errors.CLIError || process.env.DEBUG) return super.catch(error)
    const exit = error instanceof JobCancelled ? 130 : 1
    return super.catch(Object.assign(new Errors.CLIError(error.message, {exit}), {exitCode: exit}))
  }
}
