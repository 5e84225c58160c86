import {existsSync, renameSync, rmSync} from 'node:fs'

import {Args, Flags} from '@oclif/core'

import {checkAndUnpack, nonEmpty} from '../../lib/bundle.js'
import {BiflowCommand} from '../../lib/command.js'

interface VerifyResult {
  kind: string
  files: number
}

interface ImportBundleResult {
  run: string
  kind: string
  files: number
}

export default class ImportBundle extends BiflowCommand {
  static description = `Unpack a bundle made by \`biflow export\` into a run folder. Every archive entry is checked before
anything is written: absolute paths, \`..\`, links, devices and files a bundle does not hold are refused. The
unpacked files must match the checksums in bundle.json and the weights must load before the folder is moved
into place; an existing --out is replaced only with --force.`

  static examples = [
    '<%= config.bin %> import bundle mnist-biflow.tar.gz --out runs/mnist-g',
    '<%= config.bin %> import bundle model.tar.gz --out runs/model --force --json',
  ]

  static args = {
    bundle: Args.string({description: 'the bundle (.tar.gz from biflow export)', required: true}),
  }

  static flags = {
    out: Flags.string({description: 'the run folder to create', required: true}),
    force: Flags.boolean({description: 'replace an existing --out folder'}),
  }

  async run(): Promise<ImportBundleResult> {
    const {args, flags} = await this.parse(ImportBundle)
    if (!existsSync(args.bundle)) this.error(`${args.bundle} does not exist`, {exit: 1})
    if (nonEmpty(flags.out) && !flags.force) this.error(`${flags.out} exists and is not empty; choose another --out or add --force to replace it`, {exit: 1})
    const checked = await this.spin('checking the bundle entries', () => checkAndUnpack(args.bundle))
    const staging = await this.spin('unpacking', () => checked.staging(flags.out))
    try {
      const v = await this.job<VerifyResult>('bundle.verify', {dir: staging})
      if (existsSync(flags.out)) rmSync(flags.out, {recursive: true, force: true})
      renameSync(staging, flags.out)
      this.log(`imported ${args.bundle} (${v.kind}, ${v.files} files, checksums verified) into ${flags.out}`)
      return {run: flags.out, kind: v.kind, files: v.files}
    } catch (error) {
      rmSync(staging, {recursive: true, force: true})
      throw error
    }
  }
}
