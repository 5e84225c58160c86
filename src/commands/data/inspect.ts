
import {BiflowCommand} from '../../lib/command.js'
import {optionArgs, optionFlags} from '../../lib/options.js'

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

  static args = optionArgs('data.inspect', ['dir'])

  static flags = optionFlags('data.inspect', {dir: 'argument'})

  async run(): Promise<InspectResult> {
    const {args, flags} = await this.parse(DataInspect)
    const r = await this.job<InspectResult>('data.inspect', {...args, ...this.options('data.inspect', flags)})
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
