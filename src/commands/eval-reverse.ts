import {BiflowCommand} from '../lib/command.js'
import {optionFlags} from '../lib/options.js'
import {deviceFlags} from '../lib/device.js'

interface EvalReverseResult {
  num: number
  split: string
  reconstructionMse: number
  /** null for a latent run (its MSE is in latent units) */
  reconstructionPsnr: number | null
  values: 'pixels' | 'latents'
  reconstructionLpips?: number | null
  numExact: number
  reverseVsExactMse: number
  bpdReverseSamples: number
  bpdExactSamples: number
  bpdData: number
}

export default class EvalReverse extends BiflowCommand {
  static description = `How well a distilled reverse model G inverts its forward flow F, on held-out images.

Reports the MSE and PSNR of G(F(x + sigma*eps)) against x, the distance between G(z) and F's exact inverse
(causal decoding) of the same noise z, and bits/dim under F of G's samples, of exact samples and of the data
(each clamped to [-1,1], no dequantisation, so the three compare).`

  static examples = [
    '<%= config.bin %> eval-reverse --model runs/mnist-g --data data/mnist',
    '<%= config.bin %> eval-reverse --model runs/mnist-g --data data/mnist --limit 1000 --num-exact 64 --json',
  ]

  static flags = {
    ...deviceFlags,
    ...optionFlags('eval-reverse'),
  }

  async run(): Promise<EvalReverseResult> {
    const {flags} = await this.parse(EvalReverse)
    const r = await this.job<EvalReverseResult>('eval-reverse', {...this.options('device', flags), ...this.options('eval-reverse', flags)})
    const lpips = r.reconstructionLpips === null || r.reconstructionLpips === undefined ? '' : `, LPIPS ${r.reconstructionLpips.toFixed(4)}`
    // A latent run's MSE is in latent units, where a PSNR means nothing (the core gives none).
    const psnr = r.reconstructionPsnr === null ? '' : `, PSNR ${r.reconstructionPsnr.toFixed(2)} dB`
    const what = r.values === 'latents' ? `the latents of ${r.num} ${r.split} images` : `${r.num} ${r.split} images`
    this.log(`reconstruction of ${what}: MSE ${r.reconstructionMse.toFixed(5)}${psnr}${lpips}`)
    if (r.values === 'latents') this.log('(bits/dim below are differential, per latent value: they compare runs on these latents, not pixel models)')
    this.log(`G(z) vs exact inverse of the same z (${r.numExact} draws): MSE ${r.reverseVsExactMse.toFixed(5)}`)
    this.log(`bits/dim under F: reverse samples ${r.bpdReverseSamples.toFixed(3)}, exact samples ${r.bpdExactSamples.toFixed(3)}, data ${r.bpdData.toFixed(3)}`)
    return r
  }
}
