// Renders core job events: on a terminal a cli-progress bar for counted work and an ora spinner for a
// phase without a count (loading, hashing, staging); JSON lines with --json; plain lines otherwise.
import cliProgress from 'cli-progress'
import ora, {Ora} from 'ora'

export type CoreEvent =
  | {type: 'start'; phase: string; total: number | null}
  | {type: 'progress'; phase: string; done: number; total: number | null; rate: number; metrics: Record<string, unknown>}
  | {type: 'end'; phase: string}
  | {type: 'message'; text: string}

export type ProgressMode = 'bar' | 'json' | 'plain' | 'quiet'

function formatValue(v: unknown): string {
  if (typeof v !== 'number') return String(v)
  if (Number.isInteger(v)) return String(v)
  const a = Math.abs(v)
  return a !== 0 && (a < 1e-3 || a >= 1e5) ? v.toExponential(3) : v.toFixed(4)
}

function formatMetrics(metrics: Record<string, unknown>): string {
  return Object.entries(metrics)
    .map(([k, v]) => `${k} ${formatValue(v)}`)
    .join('  ')
}

function formatEta(seconds: number): string {
  if (!Number.isFinite(seconds) || seconds < 0) return '?'
  const s = Math.round(seconds)
  const h = Math.floor(s / 3600)
  const m = Math.floor((s % 3600) / 60)
  return h > 0 ? `${h}h${String(m).padStart(2, '0')}m` : `${m}m${String(s % 60).padStart(2, '0')}s`
}

export class ProgressRenderer {
  private bar?: cliProgress.SingleBar
  private spinner?: Ora
  private lastPlain = 0
  private lastDone = -1

  constructor(
    private readonly mode: ProgressMode,
    private readonly write: (line: string) => void = (line) => process.stderr.write(line + '\n'),
  ) {}

  handle(event: CoreEvent): void {
    if (this.mode === 'quiet') return
    if (this.mode === 'json') {
      this.write(JSON.stringify(event))
      return
    }

    switch (event.type) {
      case 'start': {
        this.lastDone = -1
        if (this.mode === 'bar' && !event.total) {
          this.spinner = ora({text: event.phase, stream: process.stderr}).start()
        } else if (this.mode === 'bar') {
          this.bar = new cliProgress.SingleBar(
            {
              format: `${event.phase} |{bar}| {value}/{total} {rate}/s eta {etaText} {metrics}`,
              hideCursor: true,
              stream: process.stderr,
              etaBuffer: 50,
            },
            cliProgress.Presets.shades_classic,
          )
          this.bar.start(event.total ?? 0, 0, {rate: '0', etaText: '?', metrics: ''})
        } else {
          this.write(`${event.phase}: started${event.total ? ` (${event.total})` : ''}`)
        }

        break
      }

      case 'progress': {
        const eta = event.total && event.rate > 0 ? (event.total - event.done) / event.rate : Number.NaN
        const payload = {rate: formatValue(event.rate), etaText: formatEta(eta), metrics: formatMetrics(event.metrics)}
        if (this.spinner) {
          this.spinner.text = `${event.phase} ${event.done}  ${payload.metrics}`.trimEnd()
        } else if (this.bar) {
          if (event.total) this.bar.setTotal(event.total)
          this.bar.update(event.done, payload)
        } else if (this.mode === 'plain') {
          const now = Date.now()
          const finished = event.done === event.total && event.done !== this.lastDone
          if (now - this.lastPlain >= 2000 || finished) {
            this.lastPlain = now
            this.lastDone = event.done
            const of = event.total ? `/${event.total}` : ''
            this.write(`${event.phase}: ${event.done}${of}  ${payload.rate}/s  eta ${payload.etaText}  ${payload.metrics}`.trimEnd())
          }
        }

        break
      }

      case 'end': {
        if (this.spinner) {
          this.spinner.succeed(event.phase)
          this.spinner = undefined
        } else if (this.bar) {
          this.bar.stop()
          this.bar = undefined
        } else if (this.mode === 'plain') {
          this.write(`${event.phase}: done`)
        }

        break
      }

      case 'message': {
        if (this.bar) this.bar.stop()
        if (this.spinner) this.spinner.clear()
        this.write(event.text)
        break
      }
    }
  }

  stop(): void {
    this.spinner?.stop()
    this.spinner = undefined
    this.bar?.stop()
    this.bar = undefined
  }
}
