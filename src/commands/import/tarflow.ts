import {Args, Flags} from '@oclif/core'

import {BiflowCommand} from '../../lib/command.js'

interface ImportResult {
  run: string
  model: Record<string, unknown>
  parameters: number
}

export default class ImportTarflow extends BiflowCommand {
  static description =
    'Import a reference TARFlow checkpoint (PyTorch state_dict .pth) as a biflow run; the configuration is inferred from the tensor shapes'
  static examples = [
    '<%= config.bin %> import tarflow afhq_model.pth --out runs/afhq --img-size 256',
    '<%= config.bin %> import tarflow tiny.pth --out runs/tiny --in-channels 3 --force',
  ]
  static args = {
    checkpoint: Args.string({description: 'the reference TARFlow state_dict (.pth, PyTorch zip format)', required: true}),
  }
  static flags = {
    out: Flags.string({description: 'the run folder to create', required: true}),
    'img-size': Flags.integer({description: 'image size in pixels, when the shapes cannot tell it', min: 1}),
    'in-channels': Flags.integer({description: 'image channels, when the shapes cannot tell them (default 3)', min: 1}),
    force: Flags.boolean({description: 'replace an existing run folder'}),
  }

  async run(): Promise<ImportResult> {
    const {args, flags} = await this.parse(ImportTarflow)
    const result = await this.job<ImportResult>('import-tarflow', {
      checkpoint: args.checkpoint,
      out: flags.out,
      imgSize: flags['img-size'],
      inChannels: flags['in-channels'],
      force: flags.force,
    })
    const m = result.model as {imgSize: number; inChannels: number; patchSize: number; channels: number; numBlocks: number; layersPerBlock: number; numClasses: number}
    this.log(
      `imported ${result.run}: ${m.inChannels}x${m.imgSize}x${m.imgSize} images, patch ${m.patchSize}, ${m.channels} channels, ` +
        `${m.numBlocks} blocks x ${m.layersPerBlock} layers, ${m.numClasses} classes, ${result.parameters} parameters`,
    )
    return result
  }
}
