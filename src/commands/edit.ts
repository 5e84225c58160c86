import {Flags} from '@oclif/core'

import {BiflowCommand} from '../lib/command.js'
import {deviceFlags, deviceOptions} from '../lib/device.js'

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
    model: Flags.string({description: 'the distilled run (biflow distill)', required: true}),
    image: Flags.string({description: "the image to edit (PNG/JPEG/WebP, the model's size)", required: true}),
    mask: Flags.string({description: 'inpainting mask, same size: black = keep, white = redraw', exactlyOne: ['mask', 'to-class']}),
    'to-class': Flags.integer({description: 'class editing: decode the same noise under this class', exactlyOne: ['mask', 'to-class']}),
    label: Flags.integer({description: 'the class of --image (default: none, the mean class embedding)'}),
    num: Flags.integer({description: 'number of variants', min: 1, default: 4}),
    seed: Flags.integer({description: 'seed of the noise', default: 0}),
    out: Flags.string({description: 'output folder', required: true}),
    force: Flags.boolean({description: 'write into --out even when it already holds files'}),
  }

  async run(): Promise<EditResult> {
    const {flags} = await this.parse(Edit)
    const r = await this.job<EditResult>('edit', {
      ...deviceOptions(flags),
      model: flags.model,
      image: flags.image,
      mask: flags.mask,
      toClass: flags['to-class'],
      label: flags.label,
      num: flags.num,
      seed: flags.seed,
      out: flags.out,
      force: flags.force,
    })
    this.log(`wrote ${r.num} ${r.kind === 'inpaint' ? 'inpainted' : 'class-edited'} variants to ${r.out} (grid.png shows the input first)`)
    return r
  }
}
