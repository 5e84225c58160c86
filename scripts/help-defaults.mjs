// Writes fixtures/help-defaults.json: for every command, the flags and the defaults its `--help` shows,
// read from the build in ROOT (default: this repo). test/help.test.ts checks the current build against it,
// so a change to how flags are declared cannot silently change what users are told.
//   node scripts/help-defaults.mjs [ROOT]
import {execFileSync} from 'node:child_process'
import {readdirSync, readFileSync, writeFileSync} from 'node:fs'
import {dirname, join, relative, resolve, sep} from 'node:path'
import {fileURLToPath} from 'node:url'

import {parseHelp} from './lib/help-defaults.mjs'

const here = join(dirname(fileURLToPath(import.meta.url)), '..')
const root = resolve(process.argv[2] ?? here)

// The command list is oclif's: every .js under package.json's oclif.commands, `data/prepare.js` -> `data prepare`.
const commandsDir = join(root, JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')).oclif.commands)
const commands = readdirSync(commandsDir, {recursive: true})
  .filter((f) => f.endsWith('.js'))
  .map((f) => relative('', f).replace(/\.js$/, '').split(sep).join(' '))
  .sort()

const fixture = {}
for (const cmd of commands) {
  const help = execFileSync(process.execPath, [join(root, 'bin', 'run.js'), ...cmd.split(' '), '--help'], {
    cwd: root,
    encoding: 'utf8',
    env: {...process.env, OCLIF_COLUMNS: '80'}, // oclif's width when piped; narrow widths change the layout
  })
  fixture[cmd] = parseHelp(help)
  const f = fixture[cmd]
  console.error(`${cmd}: ${f.flags.length} flags, ${Object.keys(f.defaults).length} defaults, ${f.args.length} args, ${Object.keys(f.argDefaults).length} arg defaults`)
}
writeFileSync(join(here, 'fixtures', 'help-defaults.json'), JSON.stringify(fixture, null, 2) + '\n')
