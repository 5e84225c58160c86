// Every command's `--help` still lists the same flags and shows the same defaults as recorded in
// fixtures/help-defaults.json (regenerate with `node scripts/help-defaults.mjs` after an intended change).
import {readFileSync} from 'node:fs'
import {join} from 'node:path'
import {describe, expect, it} from 'vitest'

import {parseHelp} from '../scripts/lib/help-defaults.mjs'
import {fixtures, runCli} from './helpers.js'

const expected: Record<string, unknown> = JSON.parse(readFileSync(join(fixtures, 'help-defaults.json'), 'utf8'))

describe('--help defaults', () => {
  it.each(Object.keys(expected))('%s --help shows the recorded flags and defaults', (cmd) => {
    // Width pinned as in scripts/help-defaults.mjs: below ~60 columns oclif puts descriptions under the
    // flag names, a layout the parser does not read.
    const r = runCli([...cmd.split(' '), '--help'], {env: {OCLIF_COLUMNS: '80'}})
    expect(r.code, r.stderr).toBe(0)
    expect(parseHelp(r.stdout)).toEqual(expected[cmd])
  })
})
