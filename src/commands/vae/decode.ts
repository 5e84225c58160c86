import {BiflowCommand} from '../../lib/command.js'
import {deviceFlags} from '../../lib/device.js'
import {optionArgs, optionFlags} from '../../lib/options.js'

interface DecodeResult {
  out: string
  num: number
  shape: number[]
  format: string
  files: string[]
}

export default class VaeDecode extends BiflowCommand {
  static description = `Decode latents back into images

The latents are read as training sees them, (z - shift) * scaling (what \`biflow vae encode\` writes):
a float .npy of N x L x h x w. Images are written as PNGs (one per latent, and grid.png) or as one
images.npy (N x C x H x W, float32 in [-1, 1]).

--vae is a diffusers AutoencoderKL folder: config.json and diffusion_pytorch_model.safetensors (or .bin).`

  static examples = [
    '<%= config.bin %> vae decode latents.npy --vae sd-vae-ft-ema/ --out decoded/',
    '<%= config.bin %> vae decode latents.npy --vae sd-vae-ft-ema/ --out decoded/ --format npy',
  ]

  static args = optionArgs('vae.decode', ['latents'])
  static flags = {...deviceFlags, ...optionFlags('vae.decode', {latents: 'argument'})}

  async run(): Promise<DecodeResult> {
    const {args, flags} = await this.parse(VaeDecode)
    const r = await this.job<DecodeResult>('vae.decode', {...args, ...this.options('device', flags), ...this.options('vae.decode', flags)})
    this.log(`decoded ${r.num} latents to ${r.format === 'png' ? `${r.num} PNGs` : 'images.npy'} of ${r.shape.slice(1).join('x')} in ${r.out}`)
    return r
  }
}
