import {Flags} from '@oclif/core'

import {BiflowCommand} from '../lib/command.js'

interface SampleResult {
  out: string
  num: number
  format: string
  files: string[]
  imagesPerSecond: number
  denoised: boolean
}

export default class Sample extends BiflowCommand {
  static description =
    'Generate images from a run: --method exact decodes the forward flow causally (B*(T-1) steps with a KV cache), then one score-based denoising step'
  static examples = [
    '<%= config.bin %> sample --model runs/mnist --num 64 --out samples/',
    '<%= config.bin %> sample --model runs/afhq --method exact --guidance 1.5 --annealed --labels 0,1,2 --num 12 --out samples/ --format npz',
    '<%= config.bin %> sample --model runs/tiny --noise z.npy --format npy --out decoded/ --no-denoise',
  ]
  static flags = {
    model: Flags.string({description: 'the run folder (trained or imported)', required: true}),
    out: Flags.string({description: 'output folder', required: true}),
    num: Flags.integer({description: 'number of images (default 16, or the number of --noise tokens)', min: 1}),
    method: Flags.string({description: 'exact: causal decoding of the forward flow; reverse: the distilled 1-NFE model', options: ['exact', 'reverse'], default: 'exact'}),
    guidance: Flags.string({description: 'classifier-free guidance weight w (0 = off)', default: '0'}),
    annealed: Flags.boolean({description: 'anneal the guidance weight as w*(i+1)/(T-1) over the tokens'}),
    'attn-temp': Flags.string({description: 'attention temperature of the guiding pass (guidance for unconditional models)', default: '1'}),
    denoise: Flags.boolean({description: 'apply the score-based denoising step (default: on when the noise level is known)', allowNo: true}),
    'noise-std': Flags.string({description: 'training noise level sigma for denoising (default: from the run)'}),
    noise: Flags.string({description: 'decode these noise tokens (.npy, float32 N,T,D) instead of drawing them'}),
    labels: Flags.string({description: 'class labels, comma separated (cycled over the images; -1 = no class)'}),
    seed: Flags.integer({description: 'random seed for the noise', default: 0}),
    format: Flags.string({description: 'png: one file per image plus grid.png; npz: uint8 N,H,W,C under arr_0; npy: float32 N,C,H,W', options: ['png', 'npz', 'npy'], default: 'png'}),
    'batch-size': Flags.integer({description: 'images decoded at once', min: 1, default: 64}),
    force: Flags.boolean({description: 'write into --out even when it already holds files (same-named files are replaced)'}),
  }

  async run(): Promise<SampleResult> {
    const {flags} = await this.parse(Sample)
    const num = (name: string, v: string | undefined): number | undefined => {
      if (v === undefined) return undefined
      const x = Number(v)
      if (!Number.isFinite(x)) this.error(`--${name} must be a number, got '${v}'`)
      return x
    }
    let labels: number[] | undefined
    if (flags.labels !== undefined) {
      labels = flags.labels.split(',').map((s) => {
        const v = Number(s.trim())
        if (!Number.isInteger(v)) this.error(`--labels must be comma-separated integers, got '${s}'`)
        return v
      })
    }
    const result = await this.job<SampleResult>('sample', {
      model: flags.model,
      out: flags.out,
      num: flags.num,
      method: flags.method,
      guidance: num('guidance', flags.guidance),
      annealed: flags.annealed,
      attnTemp: num('attn-temp', flags['attn-temp']),
      denoise: flags.denoise,
      noiseStd: num('noise-std', flags['noise-std']),
      noise: flags.noise,
      labels,
      seed: flags.seed,
      format: flags.format,
      batchSize: flags['batch-size'],
      force: flags.force,
    })
    this.log(
      `wrote ${result.num} images to ${result.out} (${result.format}${result.denoised ? ', denoised' : ''}, ${result.imagesPerSecond.toFixed(2)} images/s)`,
    )
    return result
  }
}
