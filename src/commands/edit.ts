import {BiflowCommand} from '../lib/command.js'
import {optionFlags} from '../lib/options.js'
import {deviceFlags} from '../lib/device.js'

interface EditResult {
  out: string
  kind: string
  num: number
  files: string[]
}

export default class Edit extends BiflowCommand {
  static description = `Edit an image in noise space with a distilled run (BiFlow eq. 6): z = F(x + sigma*eps), then x' = G(z').

Inpainting (--mask): z is kept where the mask is black and redrawn where it is white. Class editing
(--to-class K): the same z decoded under class K. Each of --num variants draws its own noise. Writes
input.png, edit-NNN.png and grid.png (the input first).`

  static examples = [
    '<%= config.bin %> edit --model runs/mnist-g --image digit.png --mask lower-half.png --num 8 --out edits/',
    '<%= config.bin %> edit --model runs/mnist-g --image digit.png --label 3 --to-class 8 --out edits/',
  ]

  static flags = {
    ...deviceFlags,
    ...optionFlags('edit', {mask: {exactlyOne: ['mask', 'to-class']}, 'to-class': {exactlyOne: ['mask', 'to-class']}}),
  }

  async run(): Promise<EditResult> {
    const {flags} = await this.parse(Edit)
    const r = await this.job<EditResult>('edit', {...this.options('device', flags), ...this.options('edit', flags)})
    this.log(`wrote ${r.num} ${r.kind === 'inpaint' ? 'inpainted' : 'class-edited'} variants to ${r.out} (grid.png shows the input first)`)
    return r
  }
}
