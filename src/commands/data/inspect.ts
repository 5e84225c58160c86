import {Args, Flags} from '@oclif/core'

import {BiflowCommand} from '../../lib/command.js'

export interface InspectResult {
  dir: string
  version: number
  count: number
  height: number
  width: number
  channels: number
  classes: {name: string; count: number}[]
  train: number
  val: number
  source: {kind: string; input: string; size: number | null; resize: string; limit: number | null}
  shards: number
  checksum: string
  verified: boolean
  skipped: {path: string; error: string}[]
  grid: string
  gridRows: number
}

export default class DataInspect extends BiflowCommand {
  static description = 'Show a prepared dataset: its manifest summary, and a PNG grid of sample images (a row per class when labelled)'

  static examples = [
    '<%= config.bin %> data inspect data/mnist',
    '<%= config.bin %> data inspect data/afhq64 --grid afhq.png --per-row 12 --verify',
  ]

  static args = {
    dir: Args.string({description: 'a dataset folder made by `biflow data prepare`', required: true}),
  }

  static flags = {
    grid: Flags.string({description: 'where to write the PNG grid (default: DIR/preview.png)'}),
    'per-row': Flags.integer({description: 'images per row of the grid', default: 8, min: 1, max: 256}),
    rows: Flags.integer({description: 'rows of the grid at most (one per class when labelled)', default: 10, min: 1, max: 1000}),
    verify: Flags.boolean({description: 'recompute the content checksum and compare it with the manifest'}),
  }

  async run(): Promise<InspectResult> {
    const {args, flags} = await this.parse(DataInspect)
    const r = await this.job<InspectResult>('data.inspect', {
      dir: args.dir,
      grid: flags.grid,
      perRow: flags['per-row'],
      rows: flags.rows,
      verify: flags.verify,
    })
    const shown = r.classes.slice(0, 10).map((c) => `${c.name} (${c.count})`)
    if (r.classes.length > 10) shown.push(`... ${r.classes.length - 10} more`)
    const lines = [
      `dataset  ${r.dir} (format version ${r.version})`,
      `images   ${r.count} (train ${r.train}, val ${r.val}) in ${r.shards} shard${r.shards === 1 ? '' : 's'}`,
      `shape    ${r.channels} x ${r.height} x ${r.width} (C x H x W, uint8)`,
      `classes  ${r.classes.length > 0 ? `${r.classes.length}: ${shown.join(', ')}` : 'none (unlabelled)'}`,
      `source   ${r.source.kind} ${r.source.input}${r.source.size ? `, resized to ${r.source.size}` : ''}${r.source.limit ? `, limit ${r.source.limit}` : ''}`,
      `checksum sha256 ${r.checksum}${r.verified ? ' (verified)' : ''}`,
    ]
    if (r.skipped.length > 0) lines.push(`skipped  ${r.skipped.length} unreadable input files`)
    lines.push(`grid     ${r.grid} (${r.gridRows} rows)`)
    this.log(lines.join('\n'))
    return r
  }
}
