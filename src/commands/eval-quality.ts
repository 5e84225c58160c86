
import {BiflowCommand} from '../lib/command.js'
import {optionArgs, optionFlags} from '../lib/options.js'
import {deviceFlags} from '../lib/device.js'

export interface EvalQualityResult {
  source: string
  method: string | null
  guidance: number | null
  temperature: number | null
  num: number
  numRef: number
  fd: number
  labelAccuracy: number | null
  precision: number
  recall: number
  k: number
  diversity: number | null
  dataDiversity: number | null
  diversityRatio: number | null
  diversityGroupedBy: string
  samplingSeconds: number | null
  judge: {dir: string; heldOutAccuracy: number; accuracyOnReference: number}
}

export default class EvalQuality extends BiflowCommand {
  static description = `Judge samples offline: FD_J, label accuracy, precision, recall and diversity.

Samples come from a run (--model: --method reverse for G's one evaluation, exact for causal decoding of F,
with --guidance, --temperature, --num, --seed or --noise, so both samplers can see the same noise) or from
IMAGES: a folder of images, an .npz (arr_0 images, arr_1 labels as \`biflow sample --format npz\` writes
them) or a prepared dataset (its train split). They are compared with the held-out split of --data in the
features of a judge from \`biflow judge train\`:

  FD_J            Frechet distance between the two feature distributions (lower is better; 0 = same)
  label accuracy  how often the judge recognises the requested class in conditional samples
  precision       share of samples inside the data's k-NN manifold (k = 3; fidelity)
  recall          share of data inside the samples' k-NN manifold (coverage; near 0 = collapse)
  diversity       mean pairwise feature distance within a class, and its ratio to the data's

Samples are quantised to 8 bits as saved PNGs are, so a run and the PNGs sampled from it score the same.`

  static examples = [
    '<%= config.bin %> eval-quality --model runs/mnist-g --judge judges/mnist32 --data data/mnist32 --num 1000',
    '<%= config.bin %> eval-quality --model runs/mnist-g --method exact --judge judges/mnist32 --data data/mnist32 --guidance 1 --json',
    '<%= config.bin %> eval-quality samples/samples.npz --judge judges/mnist32 --data data/mnist32',
  ]

  static args = optionArgs('eval-quality', ['images'])

  static flags = {
    ...deviceFlags,
    ...optionFlags('eval-quality', {images: 'argument'}),
  }

  async run(): Promise<EvalQualityResult> {
    const {args, flags} = await this.parse(EvalQuality)
    if (!args.images === !flags.model) this.error('give either --model RUN or IMAGES (not both, not neither)', {exit: 2})
    const r = await this.job<EvalQualityResult>('eval-quality', {...this.options('device', flags), ...args, ...this.options('eval-quality', flags)})
    const f = (v: number | null, d = 3) => (v === null ? 'n/a' : v.toFixed(d))
    this.log(`${r.source}: ${r.num} images against ${r.numRef} held-out`)
    this.log(`  FD_J ${f(r.fd, 2)}   label accuracy ${r.labelAccuracy === null ? 'n/a' : (100 * r.labelAccuracy).toFixed(1) + '%'}   precision ${f(r.precision)}   recall ${f(r.recall)}`)
    this.log(`  within-class diversity ${f(r.diversity)} (data ${f(r.dataDiversity)}, ratio ${f(r.diversityRatio)})`)
    return r
  }
}
