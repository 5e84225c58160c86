import {join} from 'node:path'

import {builtin} from '../../lib/builtin.js'
import {BiflowCommand} from '../../lib/command.js'
import {deviceFlags} from '../../lib/device.js'
import {optionArgs, optionFlags} from '../../lib/options.js'

export interface PrepareResult {
  out: string
  count: number
  height: number
  width: number
  channels: number
  classes: number
  train: number
  val: number
  skipped: number
  kind: string
  checksum: string
  seconds: number
  imagesPerSec: number
  latent?: {vae: string; scalingFactor: number; shiftFactor: number; imageShape: number[]}
}

export default class DataPrepare extends BiflowCommand {
  static description = [
    'Prepare a dataset: decode images into compact uint8 shards with a manifest',
    '',
    'INPUT is detected automatically (or set with --format): an image folder (class subfolders become labels in sorted order; a flat folder is unlabelled), a .tar/.tar.gz/.tgz of such a tree (streamed, never extracted), a numpy .npz of uint8 images (N,H,W,C or N,C,H,W under data, arr_0 or x; labels under labels or y), a folder of MNIST idx files (gzipped or not), or builtin:mnist (the MNIST training set shipped with biflow).',
    '',
    '--size N resizes the shorter side to N and crops the center N x N: 2x2 box halving while the shorter side is at least 2N, then a Catmull-Rom bicubic filter, as the ADM/TARFlow pipelines do. Without --size every image must have the same size.',
    '',
    '--vae DIR stores each image\'s latents instead of its pixels: the images (prepared at --size, RGB) go through the VAE (a diffusers AutoencoderKL folder, as stabilityai/sd-vae-ft-ema) and each record holds (mean - shift) * scaling as float16, the latents as training sees them (the posterior mean: a prepared dataset stays a function of its images). The manifest names the VAE and its checksum; `data inspect` decodes its grid with it. --device runs the encoder on a GPU.',
    '',
    'The dataset is built next to DIR and renamed into place only when complete: a failure or Ctrl-C leaves DIR as it was. Decoding runs in parallel on all cores. A --vae prepare is resumable: its work so far stays in .DIR.latent-partial, and the same command continues it (other options start over).',
  ].join('\n')

  static examples = [
    '<%= config.bin %> data prepare builtin:mnist --out data/mnist',
    '<%= config.bin %> data prepare ~/images/afhq --out data/afhq64 --size 64 --val-fraction 0.01',
    '<%= config.bin %> data prepare imagenet32_train.npz --out data/in32 --limit 100000',
    '<%= config.bin %> data prepare photos.tar.gz --out data/photos --size 32 --skip-bad --force',
    '<%= config.bin %> data prepare ~/imagenet/train --out data/in256-latents --size 256 --vae sd-vae-ft-ema/',
  ]

  static args = optionArgs('data.prepare', ['input'])

  static flags = {...deviceFlags, ...optionFlags('data.prepare', {input: 'argument', out: {char: 'o'}, 'source-name': 'given', 'records-per-shard': 'given'})}

  async run(): Promise<PrepareResult> {
    const {args, flags} = await this.parse(DataPrepare)
    // builtin:NAME is a dataset shipped with the CLI: the core reads its files under their own kind.
    const input = args.input as string // required: oclif refuses a missing one
    const given = input.startsWith('builtin:') ? builtin(input.slice('builtin:'.length)) : undefined
    const r = await this.job<PrepareResult>('data.prepare', {
      ...this.options('device', flags),
      ...this.options('data.prepare', flags),
      ...(given ? {input: given.input, format: given.format, sourceName: input} : {input}),
    })
    if (r.latent) this.log(`latents (${r.channels}x${r.height}x${r.width}, float16) of ${r.latent.imageShape.join('x')} images through the VAE ${r.latent.vae}`)
    const labels = r.classes > 0 ? `${r.classes} classes` : 'unlabelled'
    this.log(
      `prepared ${r.count} images (${r.channels}x${r.height}x${r.width}, ${labels}; train ${r.train}, val ${r.val}) in ${r.out}` +
        ` in ${r.seconds.toFixed(1)}s (${Math.round(r.imagesPerSec)} images/s)`,
    )
    if (r.skipped > 0) this.warn(`skipped ${r.skipped} unreadable images (listed in ${join(r.out, 'manifest.json')})`)
    return r
  }
}
