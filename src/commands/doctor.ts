import {BiflowCommand} from '../lib/command.js'

interface DoctorResult {
  version: string
  features: string[]
  cuda: {built: boolean; devices: string[]; error?: string}
  threads: number
  cores: number
  cpu: {avx2?: boolean; fma?: boolean; avx512f?: boolean}
  kernels: Record<string, string>
  defaultDevice: string
}

export default class Doctor extends BiflowCommand {
  static description = `What this install can run on: the native core's version and build features (cuda or not),
the CUDA devices it sees, the default --device, thread and core counts (RAYON_NUM_THREADS sets the threads)
and the CPU features the fused kernels use, with the variant of each kernel family this CPU runs.`

  static examples = ['<%= config.bin %> doctor', '<%= config.bin %> doctor --json']

  async run(): Promise<DoctorResult> {
    await this.parse(Doctor)
    const r = await this.job<DoctorResult>('doctor', {})
    const cuda = r.cuda.built
      ? r.cuda.devices.length > 0
        ? r.cuda.devices.map((d, i) => `cuda:${i} ${d}`).join(', ')
        : `built, but no device seen${r.cuda.error ? ` (${r.cuda.error})` : ''}`
      : 'not built (BIFLOW_CUDA=1 npm ci builds it; see the README)'
    this.log(`biflow core ${r.version}, features: ${r.features.length > 0 ? r.features.join(', ') : 'cpu only'}`)
    this.log(`CUDA: ${cuda}`)
    this.log(`default device: ${r.defaultDevice}`)
    this.log(`threads: ${r.threads} of ${r.cores} cores; AVX2 ${r.cpu.avx2 ? 'yes' : 'no'}, FMA ${r.cpu.fma ? 'yes' : 'no'}, AVX-512 ${r.cpu.avx512f ? 'yes' : 'no'}`)
    for (const [family, variant] of Object.entries(r.kernels)) this.log(`kernel ${family}: ${variant}`)
    return r
  }
}
