
import {builtin} from '../lib/builtin.js'
import {BiflowCommand} from '../lib/command.js'
import {optionFlags} from '../lib/options.js'
import {deviceFlags} from '../lib/device.js'
import type {EvalQualityResult} from './eval-quality.js'

interface Timing {
  seconds: number
  imagesPerSecond: number
  networkSteps: number
}

interface DemoResult {
  out: string
  quick: boolean
  report: string
  forward: string
  biflow: string
  samples: {reverse: string; exact: string}
  evaluation: {
    bitsPerDim: {value: number; num: number}
    evalReverse: {reconstructionMse: number; reconstructionPsnr: number; reverseVsExactMse: number; bpdReverseSamples: number; bpdExactSamples: number; bpdData: number}
    sampling: {reverse: Timing; exact: Timing}
    reverseSpeedupOverExact: number | null
    quality?: {exact: EvalQualityResult; reverse: EvalQualityResult}
  }
  seconds: number
}

export default class Demo extends BiflowCommand {
  static description = `BiFlow end to end on MNIST, in one command: prepares builtin:mnist (reused when present), trains a
small forward flow F (TARFlow), distills its learned reverse model G, samples the same noise and labels with
both methods (G: one network evaluation; exact: causal decoding of F), evaluates (bits/dim, eval-reverse,
sampling time of both methods) and writes a self-contained HTML report. The comparison grids sample with
guidance 2 and noise temperature 0.6. About 20 minutes on two idle CPU cores (--quick: 16x16 digits, under a
minute). Ctrl-C leaves resumable runs: run the same command again to continue.

With --judge DIR both samplers are also judged offline at the grids' settings (eval-quality: FD_J, label
accuracy, precision, recall, diversity of 1000 samples each) and the report shows the table side by side.
When DIR holds no judge, one is trained there first on the demo's digits (biflow judge train: about 5 more
minutes on two cores, plus about 3 for judging; --quick: under a minute).`

  static examples = [
    '<%= config.bin %> demo',
    '<%= config.bin %> demo --quick',
    '<%= config.bin %> demo --judge demo/judge',
    '<%= config.bin %> demo --out my-demo --steps 5000 --distill-steps 2000 --json',
  ]

  static flags = {
    ...optionFlags('demo', {mnist: 'given', 'command-line': 'given', device: 'given'}),
    device: deviceFlags.device,
  }

  async run(): Promise<DemoResult> {
    const {flags} = await this.parse(Demo)
    const r = await this.job<DemoResult>('demo', {
      ...this.options('demo', flags),
      mnist: builtin('mnist').input,
      commandLine: this.commandLine(),
    })
    const e = r.evaluation
    const f = (v: number | null | undefined, d = 3) => (v === null || v === undefined ? '?' : v.toFixed(d))
    this.log('')
    this.log(`BiFlow demo done in ${(r.seconds / 60).toFixed(1)} min (${flags.quick ? 'quick' : 'full'})`)
    this.log(`  forward flow F:   ${r.forward}  (${f(e.bitsPerDim.value)} bits/dim on ${e.bitsPerDim.num} held-out digits)`)
    this.log(`  reverse model G:  ${r.biflow}  (reconstruction MSE ${f(e.evalReverse.reconstructionMse, 4)}, PSNR ${f(e.evalReverse.reconstructionPsnr, 1)} dB)`)
    this.log(
      `  sampling 20 images: G ${f(e.sampling.reverse.seconds)} s (1 evaluation), exact ${f(e.sampling.exact.seconds)} s (${e.sampling.exact.networkSteps} sequential steps): ${f(e.reverseSpeedupOverExact, 0)}x faster`,
    )
    if (e.quality) {
      const q = (x: EvalQualityResult) => `FD_J ${f(x.fd, 1)}, label accuracy ${f(100 * (x.labelAccuracy ?? Number.NaN), 1)}%, recall ${f(x.recall)}`
      this.log(`  judged (guidance 2, temperature 0.6): G ${q(e.quality.reverse)}; exact ${q(e.quality.exact)}`)
    }
    this.log(`  samples: ${r.samples.reverse} and ${r.samples.exact}`)
    this.log(`  report:  ${r.report}`)
    return r
  }
}
