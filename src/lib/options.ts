// A job's options come from the core, where each is declared once (crates/biflow-core/src/jobs/options.rs):
// the flags, their help and "[default: ...]" are built from that declaration, and the parsed flags go back
// to the job under the declared keys, so a default lives in one place and a key cannot be misspelt here.
import {Args, Flags, Interfaces} from '@oclif/core'

import {native} from './native.js'

interface OptionSpec {
  key: string
  kind: 'integer' | 'count' | 'integers' | 'number' | 'text' | 'flag' | 'pair'
  help: string
  default: string | null
  choices: string[]
  required: boolean
}

type AnyFlag = Interfaces.OptionFlag<unknown> | Interfaces.BooleanFlag<unknown>

const cache = new Map<string, OptionSpec[]>()

function specs(job: string): OptionSpec[] {
  if (!cache.has(job)) cache.set(job, JSON.parse(native().optionSpecs(job)) as OptionSpec[])
  return cache.get(job)!
}

/** `batchSize` -> `batch-size`. */
const kebab = (key: string) => key.replaceAll(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)

/** A switch whose declared default is on: `--no-NAME` turns it off. */
const onByDefault = (s: OptionSpec) => s.kind === 'flag' && s.default === 'true'

/** Positional arguments of a command: declared options of `job`, in order (see `optionFlags`' `'argument'`). */
export function optionArgs(job: string, keys: string[]) {
  const args: Record<string, ReturnType<typeof Args.string>> = {}
  for (const key of keys) {
    const s = specs(job).find((x) => x.key === key)
    if (!s) throw new Error(`job '${job}' declares no option '${key}'`)
    args[key] = Args.string({description: s.help, required: s.required, ...(s.default === null ? {} : {default: s.default})})
  }

  return args
}

/**
 * The oclif flags of a job's declared options. `cli` adds what only the command line knows, by flag
 * name: relations between flags (`exactlyOne`, ...), a short name; `'argument'` for an option given
 * as a positional argument (`optionArgs`), `'given'` for one the command works out itself.
 */
export function optionFlags(job: string, cli: Record<string, 'argument' | 'given' | Record<string, unknown>> = {}) {
  const flags: Record<string, AnyFlag> = {}
  for (const s of specs(job)) {
    const name = kebab(s.key)
    const extra = cli[name] ?? {}
    if (extra === 'argument' || extra === 'given') continue
    const description = s.default === null || s.kind === 'flag' ? s.help : `${s.help} [default: ${s.default}]`
    const common = {description, ...(s.required ? {required: true} : {}), ...extra}
    const flag =
      s.kind === 'integer' || s.kind === 'count'
        ? Flags.integer({...common, min: s.kind === 'count' ? 1 : 0, ...(s.choices.length > 0 ? {options: s.choices} : {})})
        : s.kind === 'flag'
          ? Flags.boolean({...common, ...(onByDefault(s) ? {allowNo: true, default: true} : {})})
          : Flags.string({...common, ...(s.choices.length > 0 ? {options: s.choices} : {})})
    flags[name] = flag as AnyFlag
  }

  return flags
}

/**
 * The job options from parsed flags: numbers checked, `lo,hi` pairs and integer lists split, absent
 * flags left out (the core resolves their defaults). Positional arguments are the command's to add.
 * `fail` reports a malformed value.
 */
export function optionValues(job: string, flags: Record<string, unknown>, fail: (message: string) => never): Record<string, unknown> {
  const number = (name: string, v: string) => {
    const x = Number(v)
    if (v.trim() === '' || !Number.isFinite(x)) fail(`--${name} must be a number, got '${v}'`)
    return x
  }

  const out: Record<string, unknown> = {}
  for (const s of specs(job)) {
    const name = kebab(s.key)
    const v = flags[name]
    if (v === undefined || (v === false && !onByDefault(s))) continue
    if (s.kind === 'number') out[s.key] = number(name, v as string)
    else if (s.kind === 'pair') {
      const parts = (v as string).split(',')
      if (parts.length !== 2) fail(`--${name} must be lo,hi (two numbers), got '${v}'`)
      out[s.key] = parts.map((p) => number(name, p))
    } else if (s.kind === 'integers') {
      out[s.key] = (v as string).split(',').map((p) => {
        const x = Number(p.trim())
        if (p.trim() === '' || !Number.isInteger(x)) fail(`--${name} must be comma-separated integers, got '${p}'`)
        return x
      })
    } else out[s.key] = v
  }

  return out
}
