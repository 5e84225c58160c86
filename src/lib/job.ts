// Runs one core job for a command: progress rendering, Ctrl-C cancellation, typed result.
import {native} from './native.js'
import {CoreEvent, ProgressMode, ProgressRenderer} from './progress.js'

export class JobCancelled extends Error {
  constructor() {
    super('cancelled by the user (Ctrl-C)')
  }
}

export interface JobOptions {
  /** --json: progress as JSON lines on stderr (stdout is kept for the result). */
  json?: boolean
  /** Show nothing while the job runs. */
  quiet?: boolean
}

function progressMode(options: JobOptions): ProgressMode {
  if (options.quiet) return 'quiet'
  if (options.json) return 'json'
  return process.stderr.isTTY ? 'bar' : 'plain'
}

/**
 * Run the core job `name` with `options` (serialised to JSON; undefined values are dropped).
 * Ctrl-C once asks the job to stop at its next safe point; twice exits at once.
 */
export async function runJob<T>(name: string, options: object, jobOptions: JobOptions = {}): Promise<T> {
  const core = native()
  const renderer = new ProgressRenderer(progressMode(jobOptions))
  const token = new core.CancelToken()
  let interrupts = 0
  const onSigint = () => {
    interrupts += 1
    if (interrupts > 1) process.exit(130)
    renderer.stop()
    process.stderr.write('\nstopping at the next safe point (Ctrl-C again to quit at once)...\n')
    token.cancel()
  }

  // The core sends `closed` after its last event; the result may arrive before the events do.
  let onClosed = () => {}
  const closed = new Promise<void>((resolve) => (onClosed = resolve))
  const onEvent = (eventJson: string) => {
    const event = JSON.parse(eventJson) as CoreEvent | {type: 'closed'}
    if (event.type === 'closed') onClosed()
    else renderer.handle(event)
  }

  process.on('SIGINT', onSigint)
  try {
    const result = await core.runJob(name, JSON.stringify(options), onEvent, token).finally(() => closed)
    return JSON.parse(result) as T
  } catch (error) {
    if ((error as {code?: string}).code === 'Cancelled') throw new JobCancelled()
    throw error
  } finally {
    renderer.stop()
    process.off('SIGINT', onSigint)
  }
}
