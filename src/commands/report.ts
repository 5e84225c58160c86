
import {BiflowCommand} from '../lib/command.js'
import {optionArgs, optionFlags} from '../lib/options.js'

interface ReportResult {
  report: string
  bytes: number
  compare: Record<string, {seconds: number; imagesPerSecond: number; networkSteps: number; num: number}> | null
}

export default class Report extends BiflowCommand {
  static description = `Write a self-contained HTML report of a run (RUN/report.html): the command lines, the configuration,
provenance (biflow version, dataset manifest checksum, the forward run of a distilled model), the loss,
bits/dim, learning-rate and throughput curves, the sample grids written during training (--sample-every),
the same noise through both sampling methods side by side (--compare, the default), and the evaluation
results (RUN/evaluation.json, written by \`biflow demo\`). Images and charts are inline: the page fetches
nothing when opened. train and distill write one (without the comparison) when they finish.`

  static examples = [
    '<%= config.bin %> report runs/mnist-g',
    '<%= config.bin %> report runs/mnist --no-compare --out mnist.html',
    '<%= config.bin %> report runs/mnist-g --num 25 --json',
    '<%= config.bin %> report runs/mnist-g --guidance 2 --temperature 0.6',
  ]

  static args = optionArgs('report', ['run'])

  static flags = optionFlags('report', {run: 'argument'})

  async run(): Promise<ReportResult> {
    const {args, flags} = await this.parse(Report)
    const r = await this.job<ReportResult>('report', {...args, ...this.options('report', flags)})
    if (r.compare) {
      for (const [m, t] of Object.entries(r.compare)) {
        this.log(`${m}: ${t.seconds.toFixed(3)} s for ${t.num} images (${t.networkSteps} sequential network steps)`)
      }
    }

    this.log(`report: ${r.report} (${(r.bytes / 1024).toFixed(0)} KiB, self-contained)`)
    return r
  }
}
