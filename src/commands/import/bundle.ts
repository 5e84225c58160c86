import {existsSync, rmSync} from 'node:fs'

import {checkAndUnpack} from '../../lib/bundle.js'
import {BiflowCommand} from '../../lib/command.js'
import {optionArgs, optionFlags} from '../../lib/options.js'

interface ImportBundleResult {
  run: string
  kind: string
  files: number
}

export default class ImportBundle extends BiflowCommand {
  static description = `Unpack a bundle made by \`biflow export\` into a run folder. Every archive entry is checked before
anything is written: absolute paths, \`..\`, links, devices and files a bundle does not hold are refused. The
unpacked files must match the checksums in bundle.json and the weights must load before the folder is moved
into place; an existing --out is replaced only with --force. A model on VAE latents whose bundle does not
carry its VAE needs --vae DIR, the VAE it was trained with (checked by checksum).`

  static examples = [
    '<%= config.bin %> import bundle mnist-biflow.tar.gz --out runs/mnist-g',
    '<%= config.bin %> import bundle model.tar.gz --out runs/model --force --json',
    '<%= config.bin %> import bundle imagenet-g.tar.gz --out runs/imagenet-g --vae vae/sd-vae-ft-ema',
  ]

  static args = optionArgs('import-bundle', ['bundle'])
  static flags = optionFlags('import-bundle', {bundle: 'argument', unpacked: 'given'})

  async run(): Promise<ImportBundleResult> {
    const {args, flags} = await this.parse(ImportBundle)
    const bundle = args.bundle as string // required: oclif has checked it is there
    if (!existsSync(bundle)) this.error(`${bundle} does not exist`, {exit: 1})
    // npm tar checks and unpacks beside --out; the core verifies and moves the folder into place.
    const checked = await this.spin('checking the bundle entries', () => checkAndUnpack(bundle))
    const unpacked = await this.spin('unpacking', () => checked.staging(flags.out))
    try {
      const r = await this.job<ImportBundleResult>('import-bundle', {...args, ...this.options('import-bundle', flags), unpacked})
      this.log(`imported ${bundle} (${r.kind}, ${r.files} files, checksums verified) into ${r.run}`)
      return r
    } finally {
      rmSync(unpacked, {recursive: true, force: true})
    }
  }
}
