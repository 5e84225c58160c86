
import {BiflowCommand} from '../lib/command.js'
import {optionArgs, optionFlags} from '../lib/options.js'
import {deviceFlags} from '../lib/device.js'

interface SideInfo {
  path: string
  kind: string
  images?: number
  imagesPerSecond?: number
}

export interface EvalFidResult {
  fid?: number
  is?: number
  isStd?: number
  source: SideInfo
  reference?: SideInfo
  savedStats?: string | null
  inceptionWeights?: string | null
}

export default class EvalFid extends BiflowCommand {
  static description = `Compute the FID (pytorch-fid compatible) between SOURCE and REFERENCE

SOURCE and REFERENCE can each be an image folder (png/jpg/webp, not recursive), an .npz of images
(arr_0, uint8 N,H,W,C as the ADM reference batches, or float N,C,H,W in [-1,1]), an .npz of statistics
(mu, sigma as written by --save-stats or pytorch-fid), a prepared dataset directory (--split), or a
model RUN: --num N samples are drawn (--seed, --guidance; --method reverse, the 1-NFE model, for a
distilled run, else exact) and scored batch by batch, never all held in memory.

The network is the FID Inception-v3 of pytorch-fid. Its weights are pytorch-fid's published
pt_inception-2015-12-05-6726825d.pth (legacy PyTorch format), a zip-format .pth, or a .safetensors
from "biflow fid convert-weights". They are looked up in this order: --inception-weights, the
BIFLOW_INCEPTION_WEIGHTS variable, then ~/.cache/biflow/pt_inception-2015-12-05-6726825d.pth
($XDG_CACHE_HOME/biflow when set). Download: https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth`

  static examples = [
    '<%= config.bin %> eval-fid samples/ reference-stats.npz --inception-weights pt_inception-2015-12-05-6726825d.pth',
    '<%= config.bin %> eval-fid data/cifar10 --split train --save-stats cifar10-train.npz',
    '<%= config.bin %> eval-fid samples.npz VIRTUAL_imagenet64_labeled.npz --json',
    '<%= config.bin %> eval-fid samples/ --is --json',
    '<%= config.bin %> eval-fid runs/mnist data/mnist --num 10000 --seed 1 --json',
    '<%= config.bin %> eval-fid runs/mnist-g data/mnist --num 10000 --method reverse --json',
  ]

  static args = optionArgs('fid.eval', ['source', 'reference'])

  static flags = {
    ...deviceFlags,
    ...optionFlags('fid.eval', {source: 'argument', reference: 'argument'}),
  }

  async run(): Promise<EvalFidResult> {
    const {args, flags} = await this.parse(EvalFid)
    if (!args.reference && !flags['save-stats'] && !flags.is) {
      this.error('give a REFERENCE to compute the FID, or --save-stats OUT.npz, or --is', {exit: 2})
    }
    const r = await this.job<EvalFidResult>('fid.eval', {...this.options('device', flags), ...args, ...this.options('fid.eval', flags)})
    if (r.fid !== undefined) this.log(`FID: ${r.fid.toFixed(4)}`)
    if (r.is !== undefined) this.log(`IS: ${r.is.toFixed(4)} ± ${(r.isStd ?? 0).toFixed(4)}`)
    if (r.savedStats) this.log(`statistics saved to ${r.savedStats}`)
    return r
  }
}
