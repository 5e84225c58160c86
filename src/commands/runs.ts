
import {BiflowCommand} from '../lib/command.js'
import {optionArgs, optionFlags} from '../lib/options.js'

export interface RunInfo {
  dir: string
  kind: string
  status: string
  steps: number
  totalSteps: number | null
  bestBpd: number | null
  loss: number | null
  lastCheckpoint: string | null
  canResume: boolean
  lockedBy: {pid: number; host: string} | null
  error: string | null
  /** what the run models: pixels, or VAE latents (whose bits/dim do not compare with pixels') */
  space: 'pixels' | 'latents'
}

interface RunsResult {
  dir: string
  runs: RunInfo[]
}

export default class Runs extends BiflowCommand {
  static description = `List the biflow runs in a folder (and its subfolders): kind (forward, distilled, imported),
status (complete, interrupted, failed, running), steps trained, best bits/dim, last checkpoint, and whether
\`--resume\` can continue it. Read-only: it never waits for or takes a run's lock.`

  static examples = ['<%= config.bin %> runs', '<%= config.bin %> runs demo', '<%= config.bin %> runs runs/ --depth 1 --json']

  static args = optionArgs('runs', ['dir'])

  static flags = optionFlags('runs', {dir: 'argument'})

  async run(): Promise<RunsResult> {
    const {args, flags} = await this.parse(Runs)
    const r = await this.job<RunsResult>('runs', {...args, ...this.options('runs', flags)})
    if (r.runs.length === 0) {
      this.log(`no biflow runs under ${r.dir}`)
      return r
    }

    const rows = r.runs.map((x) => [
      x.dir,
      x.space === 'latents' ? `${x.kind} (latents)` : x.kind,
      x.status + (x.lockedBy ? ` (pid ${x.lockedBy.pid})` : ''),
      x.totalSteps ? `${x.steps}/${x.totalSteps}` : String(x.steps),
      x.bestBpd === null ? '-' : x.bestBpd.toFixed(3),
      x.lastCheckpoint ? x.lastCheckpoint.split(/[\\/]/).pop()! : '-',
      x.canResume ? 'yes' : 'no',
    ])
    const head = ['run', 'kind', 'status', 'steps', 'best bpd', 'checkpoint', 'resume']
    const widths = head.map((h, i) => Math.max(h.length, ...rows.map((row) => row[i].length)))
    const line = (cells: string[]) => cells.map((c, i) => c.padEnd(widths[i])).join('  ').trimEnd()
    this.log(line(head))
    for (const row of rows) this.log(line(row))
    return r
  }
}
