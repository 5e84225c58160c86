import {rmSync} from 'node:fs'

import {Args, Flags} from '@oclif/core'

import {nonEmpty, pack, tempNear} from '../lib/bundle.js'
import {BiflowCommand} from '../lib/command.js'

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
16 samples and bundle.json with the SHA-256 of every file. Import it with \`biflow import bundle\`.`

  static examples = [
    '<%= config.bin %> export runs/mnist-g --out mnist-biflow.tar.gz',
    '<%= config.bin %> export runs/mnist --out mnist-flow.tar.gz --no-preview --json',
  ]

  static args = {
    run: Args.string({description: 'the run folder to export (forward, distilled or imported)', required: true}),
  }

  static flags = {
    out: Flags.string({description: 'the bundle file to write (.tar.gz)', required: true}),
    preview: Flags.boolean({description: 'include preview.png (16 samples)', default: true, allowNo: true}),
    force: Flags.boolean({description: 'replace an existing --out file'}),
  }

  async run(): Promise<ExportResult> {
    const {args, flags} = await this.parse(Export)
    if (nonEmpty(flags.out) && !flags.force) this.error(`${flags.out} exists; choose another --out or add --force to replace it`, {exit: 1})
    const staging = tempNear(flags.out, 'export')
    try {
      const staged = await this.job<StageResult>('bundle.stage', {run: args.run, staging, preview: flags.preview ? 16 : 0})
      await this.spin(`packing ${flags.out}`, () => pack(staging, staged.files, flags.out))
      this.log(`exported ${args.run} (${staged.kind}) to ${flags.out}: ${staged.files.join(', ')}`)
      return {bundle: flags.out, kind: staged.kind, files: staged.files}
    } finally {
      rmSync(staging, {recursive: true, force: true})
    }
  }
}
