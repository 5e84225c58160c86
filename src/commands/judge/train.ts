import {Flags} from '@oclif/core'

import {BiflowCommand} from '../../lib/command.js'
import {deviceFlags, deviceOptions} from '../../lib/device.js'

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
    data: Flags.string({required: true, description: 'a prepared, labelled dataset with a held-out (val) split'}),
    out: Flags.string({required: true, description: 'the judge folder to create (judge.json, weights.safetensors)'}),
    steps: Flags.integer({min: 1, description: 'optimiser steps [default: 1500]'}),
    'batch-size': Flags.integer({min: 1, description: 'images per step [default: 64]'}),
    lr: Flags.string({description: 'peak learning rate [default: 2e-3]'}),
    seed: Flags.integer({default: 0, description: 'seed of the initial weights and the data order'}),
    'min-accuracy': Flags.string({description: 'held-out accuracy below which eval-quality refuses this judge [default: 0.9]'}),
    force: Flags.boolean({description: 'replace an existing judge folder'}),
  }

  async run(): Promise<JudgeTrainResult> {
    const {flags} = await this.parse(JudgeTrain)
    const r = await this.job<JudgeTrainResult>('judge.train', {
      ...deviceOptions(flags),
      data: flags.data,
      out: flags.out,
      steps: flags.steps,
      batchSize: flags['batch-size'],
      lr: this.number('lr', flags.lr),
      seed: flags.seed,
      minAccuracy: this.number('min-accuracy', flags['min-accuracy']),
      force: flags.force || undefined,
    })
    const pct = (v: number) => `${(100 * v).toFixed(2)}%`
    this.log(`judge ${r.out}: ${pct(r.heldOutAccuracy)} held-out accuracy on ${r.heldOutCount} images (floor ${pct(r.floor)}), ${r.steps} steps in ${r.seconds.toFixed(0)} s`)
    if (!r.usable) this.warn('below its floor: eval-quality will refuse this judge')
    return r
  }
}
