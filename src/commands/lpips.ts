import {BiflowCommand} from '../lib/command.js'
import {deviceFlags} from '../lib/device.js'
import {optionArgs, optionFlags} from '../lib/options.js'

interface LpipsResult {
  a: string
  b: string
  count: number
  mean: number
  pairs: {a: string; b: string; distance: number}[]
}

export default class Lpips extends BiflowCommand {
  static description = `The LPIPS perceptual distance (VGG, v0.1) between two images, folders or image arrays

As the lpips package 0.1.4 computes it. Folders are paired by file name, .npz arrays by index.

Weights are the user's: --lpips is the package's linear heads (lpips/weights/v0.1/vgg.pth, inside the
pip package lpips 0.1.4), --vgg torchvision's VGG16 (vgg16-397923af.pth); either may be .safetensors.
Images are compared at their own size (at least 16x16), gray ones as RGB.`

  static examples = [
    '<%= config.bin %> lpips a.png b.png --lpips vgg.pth --vgg vgg16-397923af.pth',
    '<%= config.bin %> lpips samples/ reference/ --lpips vgg.pth --vgg vgg16-397923af.pth --json',
  ]

  static args = optionArgs('lpips', ['a', 'b'])
  static flags = {...deviceFlags, ...optionFlags('lpips', {a: 'argument', b: 'argument'})}

  async run(): Promise<LpipsResult> {
    const {args, flags} = await this.parse(Lpips)
    const r = await this.job<LpipsResult>('lpips', {...args, ...this.options('device', flags), ...this.options('lpips', flags)})
    if (r.count <= 20) for (const p of r.pairs) this.log(`${p.a}\t${p.b}\t${p.distance.toFixed(6)}`)
    this.log(`LPIPS over ${r.count} pair${r.count === 1 ? '' : 's'}: mean ${r.mean.toFixed(6)}`)
    return r
  }
}
