import {BiflowCommand} from '../lib/command.js'
import {optionFlags} from '../lib/options.js'
import {deviceFlags} from '../lib/device.js'

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
after loading) and imagesPerSecond.

A run on VAE latents (trained on a dataset from \`data prepare --vae\`) samples latents and decodes them with
the VAE the run records (--vae DIR if it moved); --format latent keeps the latents (latents.npy).`
  static examples = [
    '<%= config.bin %> sample --model runs/imagenet-g --num 64 --guidance 2 --out samples/   # a latent run: decoded PNGs',
    '<%= config.bin %> sample --model runs/mnist-g --num 64 --labels 0,1,2,3,4,5,6,7,8,9 --out samples/',
    '<%= config.bin %> sample --model runs/mnist-g --method exact --num 64 --labels 0,1,2,3,4,5,6,7,8,9 --out samples-exact/',
    '<%= config.bin %> sample --model runs/mnist-g --guidance 2 --temperature 0.7 --labels 7 --num 16 --out sevens/',
    '<%= config.bin %> sample --model runs/afhq --method exact --guidance 1.5 --annealed --labels 0,1,2 --num 12 --out samples/ --format npz',
    '<%= config.bin %> sample --model runs/tiny --noise z.npy --format npy --out decoded/ --denoise none',
    '<%= config.bin %> sample --model runs/afhq-g --num 50000 --batch-size 256 --format npz --out fid-samples/ --device cuda:0 --precision bf16',
  ]
  static flags = {
    ...deviceFlags,
    ...optionFlags('sample'),
  }

  async run(): Promise<SampleResult> {
    const {flags} = await this.parse(Sample)
    const result = await this.job<SampleResult>('sample', {...this.options('device', flags), ...this.options('sample', flags)})
    this.log(
      `wrote ${result.num} ${result.method} samples to ${result.out} (${result.format}${result.denoised ? ', denoised' : ''}, ${result.samplingSeconds.toFixed(2)} s, ${result.imagesPerSecond.toFixed(2)} images/s)`,
    )
    return result
  }
}
