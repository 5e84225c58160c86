import {Args, Errors, Flags} from '@oclif/core'
import {join} from 'node:path'

import {builtin} from '../../lib/builtin.js'
import {BiflowCommand} from '../../lib/command.js'

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
}

function fraction(input: string): number {
  const v = Number(input)
  if (!Number.isFinite(v) || v < 0 || v >= 1) throw new Errors.CLIError(`--val-fraction must be a number in [0, 1), got '${input}'`, {exit: 1})
  return v
}

export default class DataPrepare extends BiflowCommand {
  static description = [
    'Prepare a dataset: decode images into compact uint8 shards with a manifest',
    '',
    'INPUT is detected automatically (or set with --format): an image folder (class subfolders become labels in sorted order; a flat folder is unlabelled), a .tar/.tar.gz/.tgz of such a tree (streamed, never extracted), a numpy .npz of uint8 images (N,H,W,C or N,C,H,W under data, arr_0 or x; labels under labels or y), a folder of MNIST idx files (gzipped or not), or builtin:mnist (the MNIST training set shipped with biflow).',
    '',
    '--size N resizes the shorter side to N and crops the center N x N: 2x2 box halving while the shorter side is at least 2N, then a Catmull-Rom bicubic filter, as the ADM/TARFlow pipelines do. Without --size every image must have the same size.',
    '',
    'The dataset is built next to DIR and renamed into place only when complete: a failure or Ctrl-C leaves DIR as it was. Decoding runs in parallel on all cores.',
  ].join('\n')

  static examples = [
    '<%= config.bin %> data prepare builtin:mnist --out data/mnist',
    '<%= config.bin %> data prepare ~/images/afhq --out data/afhq64 --size 64 --val-fraction 0.01',
    '<%= config.bin %> data prepare imagenet32_train.npz --out data/in32 --limit 100000',
    '<%= config.bin %> data prepare photos.tar.gz --out data/photos --size 32 --skip-bad --force',
  ]

  static args = {
    input: Args.string({description: 'image folder, .tar/.tar.gz/.tgz, .npz, MNIST idx folder, or builtin:mnist', required: true}),
  }

  static flags = {
    out: Flags.string({char: 'o', description: 'the dataset folder to create', required: true}),
    format: Flags.string({description: 'the input kind, when detection is not wanted', options: ['folder', 'tar', 'npz', 'idx']}),
    size: Flags.integer({description: 'resize the shorter side to N, then center crop to N x N', min: 1}),
    channels: Flags.integer({description: 'output channels, 1 (grey) or 3 (RGB); default: as the input', options: ['1', '3']}),
    limit: Flags.integer({description: 'use only the first N images of the input', min: 1}),
    'val-fraction': Flags.string({description: 'fraction of images held out as the val split, chosen from --seed', default: '0'}),
    seed: Flags.integer({description: 'seed of the val split choice', default: 0, min: 0}),
    force: Flags.boolean({description: 'replace DIR if it exists (only once the new dataset is complete)'}),
    'skip-bad': Flags.boolean({description: 'leave out unreadable images (listed in the manifest) instead of stopping'}),
  }

  async run(): Promise<PrepareResult> {
    const {args, flags} = await this.parse(DataPrepare)
    let input = args.input
    let format = flags.format
    let sourceName: string | undefined
    if (input.startsWith('builtin:')) {
      const b = builtin(input.slice('builtin:'.length))
      sourceName = input
      input = b.input
      format = b.format
    }

    const r = await this.job<PrepareResult>('data.prepare', {
      input,
      out: flags.out,
      format,
      sourceName,
      size: flags.size,
      channels: flags.channels,
      limit: flags.limit,
      valFraction: fraction(flags['val-fraction']),
      seed: flags.seed,
      force: flags.force,
      skipBad: flags['skip-bad'],
    })
    const labels = r.classes > 0 ? `${r.classes} classes` : 'unlabelled'
    this.log(
      `prepared ${r.count} images (${r.channels}x${r.height}x${r.width}, ${labels}; train ${r.train}, val ${r.val}) in ${r.out}` +
        ` in ${r.seconds.toFixed(1)}s (${Math.round(r.imagesPerSec)} images/s)`,
    )
    if (r.skipped > 0) this.warn(`skipped ${r.skipped} unreadable images (listed in ${join(r.out, 'manifest.json')})`)
    return r
  }
}
