import {BiflowCommand} from '../../lib/command.js'
import {deviceFlags} from '../../lib/device.js'
import {optionArgs, optionFlags} from '../../lib/options.js'

interface EncodeResult {
  out: string
  shape: number[]
  scaling: number
  shift: number
  posterior: 'mean' | 'sample'
}

export default class VaeEncode extends BiflowCommand {
  static description = `Encode images to the latents a latent-space run trains on

Writes (z - shift) * scaling as one float32 .npy (N x L x H/8 x W/8 for the SD VAEs), where z is the
posterior mean, or a draw from the posterior with --sample. scaling and shift come from the VAE's
config.json (SD: 0.18215 and 0; SDXL: 0.13025). The images (an image file, a folder, or an .npz array)
must share one size, a multiple of the VAE's downsampling.

--vae is a diffusers AutoencoderKL folder: config.json and diffusion_pytorch_model.safetensors (or .bin),
as stabilityai/sd-vae-ft-ema on the hub. \`biflow vae decode\` turns the latents back into images.`

  static examples = [
    '<%= config.bin %> vae encode photos/ --vae sd-vae-ft-ema/ --out latents.npy',
    '<%= config.bin %> vae encode cat.png --vae sd-vae-ft-ema/ --out cat.npy --sample --seed 1',
  ]

  static args = optionArgs('vae.encode', ['input'])
  static flags = {...deviceFlags, ...optionFlags('vae.encode', {input: 'argument'})}

  async run(): Promise<EncodeResult> {
    const {args, flags} = await this.parse(VaeEncode)
    const r = await this.job<EncodeResult>('vae.encode', {...args, ...this.options('device', flags), ...this.options('vae.encode', flags)})
    this.log(`wrote ${r.out}: latents ${r.shape.join('x')} (posterior ${r.posterior}, (z - ${r.shift}) * ${r.scaling})`)
    return r
  }
}
