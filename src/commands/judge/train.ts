import {BiflowCommand} from '../../lib/command.js'
import {optionFlags} from '../../lib/options.js'
import {deviceFlags} from '../../lib/device.js'

interface JudgeTrainResult {
  out: string
  heldOutAccuracy: number
  heldOutCount: number
  floor: number
  usable: boolean
  loss: number
  steps: number
  seconds: number
  parameters: number
}

export default class JudgeTrain extends BiflowCommand {
  static description = `Train the offline judge: a small CNN classifier of a prepared, labelled dataset.

The judge is the yardstick of \`biflow eval-quality\`: the Frechet distance in its penultimate features
(FD_J), the label accuracy of conditional samples, k-NN precision and recall, within-class diversity. It
needs no downloaded weights. It learns on the training split by cross-entropy (AdamW, warmup + cosine) and
records its accuracy on the held-out split; eval-quality refuses a judge below --min-accuracy. About two
minutes on two cores for MNIST. Never train a model against the judge: its numbers would mean nothing.`

  static examples = [
    '<%= config.bin %> judge train --data data/mnist32 --out judges/mnist32',
    '<%= config.bin %> judge train --data data/cifar10 --out judges/cifar10 --steps 6000 --min-accuracy 0.7',
  ]

  static flags = {
    ...deviceFlags,
    ...optionFlags('judge.train'),
  }

  async run(): Promise<JudgeTrainResult> {
    const {flags} = await this.parse(JudgeTrain)
    const r = await this.job<JudgeTrainResult>('judge.train', {...this.options('device', flags), ...this.options('judge.train', flags)})
    const pct = (v: number) => `${(100 * v).toFixed(2)}%`
    this.log(`judge ${r.out}: ${pct(r.heldOutAccuracy)} held-out accuracy on ${r.heldOutCount} images (floor ${pct(r.floor)}), ${r.steps} steps in ${r.seconds.toFixed(0)} s`)
    if (!r.usable) this.warn('below its floor: eval-quality will refuse this judge')
    return r
  }
}
