// The base of every biflow command: --json, and core errors turned into one clear line.
import {Command, Errors} from '@oclif/core'

import {JobCancelled, runJob} from './job.js'

export abstract class BiflowCommand extends Command {
  static enableJsonFlag = true

  /** A flag given as text that must be a number (oclif has no float flag); undefined stays undefined. */
  protected number(name: string, v: string | undefined): number | undefined {
    if (v === undefined) return undefined
    const x = Number(v)
    if (v.trim() === '' || !Number.isFinite(x)) this.error(`--${name} must be a number, got '${v}'`)
    return x
  }

  /** Run a core job, rendering its progress the way this invocation asked for. */
  protected job<T>(name: string, options: object): Promise<T> {
    return runJob<T>(name, options, {json: this.jsonEnabled()})
  }

  /**
   * Errors are user-facing sentences: printed whole (not wrapped, so paths and URLs stay intact) and
   * without a stack (DEBUG=1 keeps oclif's own handling). A cancelled job exits 130.
   */
  protected async catch(error: Error & {oclif?: {exit?: number}}): Promise<unknown> {
    if (process.env.DEBUG) return super.catch(error)
    const exit = error instanceof JobCancelled ? 130 : (error.oclif?.exit ?? 1)
    if (this.jsonEnabled()) {
      return super.catch(Object.assign(new Errors.CLIError(error.message, {exit}), {exitCode: exit}))
    }

    process.exitCode = exit
    this.logToStderr(`Error: ${error.message}`)
  }
}
