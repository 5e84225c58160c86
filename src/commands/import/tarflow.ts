
import {BiflowCommand} from '../../lib/command.js'
import {optionArgs, optionFlags} from '../../lib/options.js'

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
  static args = optionArgs('import-tarflow', ['checkpoint'])
  static flags = optionFlags('import-tarflow', {checkpoint: 'argument'})

  async run(): Promise<ImportResult> {
    const {args, flags} = await this.parse(ImportTarflow)
    const result = await this.job<ImportResult>('import-tarflow', {...args, ...this.options('import-tarflow', flags)})
    const m = result.model as {imgSize: number; inChannels: number; patchSize: number; channels: number; numBlocks: number; layersPerBlock: number; numClasses: number}
    this.log(
      `imported ${result.run}: ${m.inChannels}x${m.imgSize}x${m.imgSize} images, patch ${m.patchSize}, ${m.channels} channels, ` +
        `${m.numBlocks} blocks x ${m.layersPerBlock} layers, ${m.numClasses} classes, ${result.parameters} parameters`,
    )
    return result
  }
}
