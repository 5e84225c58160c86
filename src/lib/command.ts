// The base of every biflow command: --json, and core errors turned into one clear line.
import {Command, Errors} from '@oclif/core'

import ora from 'ora'

import {JobCancelled, runJob} from './job.js'
import {optionValues} from './options.js'

export abstract class BiflowCommand extends Command {
  static enableJsonFlag = true

  /** The options of `job` declared in the core, from the parsed flags (a malformed value stops the command). */
  protected options(job: string, flags: Record<string, unknown>): Record<string, unknown> {
    return optionValues(job, flags, (m) => this.error(m))
  }

  /** This invocation as typed (recorded by train and distill in RUN/history.jsonl). */
  protected commandLine(): string {
    return [this.config.bin, ...process.argv.slice(2)].map((a) => (/^[\w@%+=:,./-]+$/.test(a) ? a : `'${a.replaceAll("'", "'\\''")}'`)).join(' ')
  }

  /** Run a core job, rendering its progress the way this invocation asked for. */
  protected job<T>(name: string, options: object): Promise<T> {
    return runJob<T>(name, options, {json: this.jsonEnabled()})
  }

  /** Run `work` under an ora spinner (a phase without a count); silent under --json or when stderr is not a terminal. */
  protected async spin<T>(text: string, work: () => Promise<T>): Promise<T> {
    if (this.jsonEnabled() || !process.stderr.isTTY) return work()
    const spinner = ora({text, stream: process.stderr}).start()
    try {
      const result = await work()
      spinner.succeed()
      return result
    } catch (error) {
      spinner.fail()
      throw error
    }
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
