import {Flags} from '@oclif/core'

import {BiflowCommand} from '../lib/command.js'
import {deviceFlags, deviceOptions} from '../lib/device.js'

interface SampleResult {
  out: string
  method: string
  num: number
  format: string
  files: string[]
  samplingSeconds: number
  imagesPerSecond: number
  denoised: boolean
}

export default class Sample extends BiflowCommand {
  static description = `Generate images from a run.

--method reverse (the default for a distilled run): BiFlow's learned reverse model G, ONE network evaluation
per batch, guidance included (G takes the scale as an input). --method exact (the default for a forward
run, and available on a distilled one through its F): causal decoding of the forward flow, B*(T-1)
sequential steps with a KV cache, then one score-based denoising step. Both read the same --noise and
--seed, so grids of the two methods are one flag apart. --json reports samplingSeconds (sampling alone,
after loading) and imagesPerSecond.`
  static examples = [
    '<%= config.bin %> sample --model runs/mnist-g --num 64 --labels 0,1,2,3,4,5,6,7,8,9 --out samples/',
    '<%= config.bin %> sample --model runs/mnist-g --method exact --num 64 --labels 0,1,2,3,4,5,6,7,8,9 --out samples-exact/',
    '<%= config.bin %> sample --model runs/mnist-g --guidance 2 --temperature 0.7 --labels 7 --num 16 --out sevens/',
    '<%= config.bin %> sample --model runs/afhq --method exact --guidance 1.5 --annealed --labels 0,1,2 --num 12 --out samples/ --format npz',
    '<%= config.bin %> sample --model runs/tiny --noise z.npy --format npy --out decoded/ --denoise none',
    '<%= config.bin %> sample --model runs/afhq-g --num 50000 --batch-size 256 --format npz --out fid-samples/ --device cuda:0 --precision bf16',
  ]
  static flags = {
    ...deviceFlags,
    model: Flags.string({description: 'the run folder (distilled, trained or imported)', required: true}),
    out: Flags.string({description: 'output folder', required: true}),
    num: Flags.integer({description: 'number of images (default 16, or the number of --noise tokens)', min: 1}),
    method: Flags.string({description: 'reverse: the distilled 1-NFE model G; exact: causal decoding of the forward flow [default: reverse for a distilled run, else exact]', options: ['reverse', 'exact']}),
    guidance: Flags.string({description: 'classifier-free guidance weight w (0 = off)', default: '0'}),
    annealed: Flags.boolean({description: 'exact: anneal the guidance weight as w*(i+1)/(T-1) over the tokens'}),
    'attn-temp': Flags.string({description: 'exact: attention temperature of the guiding pass (guidance for unconditional models)', default: '1'}),
    denoise: Flags.string({
      description: "score: apply F's score-based denoising step; none: do not; auto: score where nothing learned denoises (exact, or G distilled with --denoise none) and the noise level is known",
      options: ['auto', 'score', 'none'],
      default: 'auto',
    }),
    'noise-std': Flags.string({description: 'training noise level sigma for denoising (default: from the run)'}),
    temperature: Flags.string({
      description: 'scale of the drawn noise, z ~ N(0, T^2): below 1 (e.g. 0.7) trades diversity for cleaner samples',
      default: '1',
    }),
    noise: Flags.string({description: 'decode these noise tokens (.npy, float32 N,T,D) instead of drawing them'}),
    labels: Flags.string({description: 'class labels, comma separated (cycled over the images; -1 = no class)'}),
    seed: Flags.integer({description: 'random seed for the noise', default: 0}),
    format: Flags.string({description: 'png: one file per image plus grid.png; npz: uint8 N,H,W,C under arr_0; npy: float32 N,C,H,W', options: ['png', 'npz', 'npy'], default: 'png'}),
    'batch-size': Flags.integer({description: 'images decoded at once', min: 1, default: 64}),
    force: Flags.boolean({description: 'write into --out even when it already holds files (same-named files are replaced)'}),
  }

  async run(): Promise<SampleResult> {
    const {flags} = await this.parse(Sample)
    const num = (name: string, v: string | undefined) => this.number(name, v)
    let labels: number[] | undefined
    if (flags.labels !== undefined) {
      labels = flags.labels.split(',').map((s) => {
        const v = Number(s.trim())
        if (!Number.isInteger(v)) this.error(`--labels must be comma-separated integers, got '${s}'`)
        return v
      })
    }
    const result = await this.job<SampleResult>('sample', {
      ...deviceOptions(flags),
      model: flags.model,
      out: flags.out,
      num: flags.num,
      method: flags.method,
      guidance: num('guidance', flags.guidance),
      annealed: flags.annealed,
      attnTemp: num('attn-temp', flags['attn-temp']),
      denoise: {auto: undefined, score: true, none: false}[flags.denoise],
      noiseStd: num('noise-std', flags['noise-std']),
      noise: flags.noise,
      temperature: num('temperature', flags.temperature),
      labels,
      seed: flags.seed,
      format: flags.format,
      batchSize: flags['batch-size'],
      force: flags.force,
    })
    this.log(
      `wrote ${result.num} ${result.method} samples to ${result.out} (${result.format}${result.denoised ? ', denoised' : ''}, ${result.samplingSeconds.toFixed(2)} s, ${result.imagesPerSecond.toFixed(2)} images/s)`,
    )
    return result
  }
}
