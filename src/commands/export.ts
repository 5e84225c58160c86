import {rmSync} from 'node:fs'

import {pack} from '../lib/bundle.js'
import {BiflowCommand} from '../lib/command.js'
import {optionArgs, optionFlags} from '../lib/options.js'

interface StageResult {
  staging: string
  files: string[]
  kind: string
}

interface ExportResult {
  bundle: string
  kind: string
  files: string[]
}

export default class Export extends BiflowCommand {
  static description = `Pack a run into a shareable bundle (.tar.gz): its config and EMA weights, for a distilled run the
forward flow it needs (forward/), a README model card (provenance, configuration, metrics), a preview grid of
16 samples and bundle.json with the SHA-256 of every file. Import it with \`biflow import bundle\`.

A run on VAE latents names its VAE by checksum; --include-vae carries the VAE itself (vae/), otherwise the
importer gives the VAE's folder with \`import bundle --vae DIR\`.`

  static examples = [
    '<%= config.bin %> export runs/mnist-g --out mnist-biflow.tar.gz',
    '<%= config.bin %> export runs/mnist --out mnist-flow.tar.gz --no-preview --json',
    '<%= config.bin %> export runs/imagenet-g --out imagenet-g.tar.gz --include-vae',
  ]

  static args = optionArgs('export', ['run'])
  static flags = optionFlags('export', {run: 'argument'})

  async run(): Promise<ExportResult> {
    const {args, flags} = await this.parse(Export)
    // The core stages the files in a folder beside --out; the archive is npm tar's.
    const staged = await this.job<StageResult>('export', {...args, ...this.options('export', flags)})
    try {
      await this.spin(`packing ${flags.out}`, () => pack(staged.staging, staged.files, flags.out))
      this.log(`exported ${args.run} (${staged.kind}) to ${flags.out}: ${staged.files.join(', ')}`)
      return {bundle: flags.out, kind: staged.kind, files: staged.files}
    } finally {
      rmSync(staged.staging, {recursive: true, force: true})
    }
  }
}
