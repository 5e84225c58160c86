// --device and --precision: the same two flags on every command that computes (the core checks them).
import {Flags} from '@oclif/core'

export const deviceFlags = {
  device: Flags.string({
    description:
      'where the maths runs: auto (the first GPU on a CUDA build that sees one, else the CPU), cpu, cuda or cuda:N',
    default: 'auto',
    helpGroup: 'DEVICE',
  }),
  precision: Flags.string({
    description: 'matrix products in f32, or bf16 with f32 weights, optimizer state and reductions (CUDA only)',
    options: ['f32', 'bf16'],
    default: 'f32',
    helpGroup: 'DEVICE',
  }),
}

/** The job options for the device flags. */
export function deviceOptions(flags: {device?: string; precision?: string}): {device?: string; precision?: string} {
  return {device: flags.device, precision: flags.precision}
}
