// Runs the benchmarks (release builds) and prints one JSON object: `npm run bench [-- area ...]`.
// Each area is a script scripts/bench-<area>.mjs that prints a JSON object as its last stdout line.
import {execFileSync} from 'node:child_process'
import {existsSync, readdirSync} from 'node:fs'
import {dirname, join} from 'node:path'
import {fileURLToPath} from 'node:url'

const here = dirname(fileURLToPath(import.meta.url))
const available = readdirSync(here)
  .map((f) => /^bench-(.+)\.mjs$/.exec(f)?.[1])
  .filter(Boolean)
const areas = process.argv.slice(2).length > 0 ? process.argv.slice(2) : available
const results = {}
for (const area of areas) {
  const script = join(here, `bench-${area}.mjs`)
  if (!existsSync(script)) {
    console.error(`no benchmark '${area}' (have: ${available.join(', ')})`)
    process.exit(2)
  }

  console.error(`bench ${area}...`)
  const out = execFileSync(process.execPath, [script], {encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit']})
  // A script prints one JSON object: on its own (possibly pretty-printed) or as its last line.
  const text = out.trim()
  try {
    results[area] = JSON.parse(text)
  } catch {
    results[area] = JSON.parse(text.split('\n').at(-1))
  }
}

console.log(JSON.stringify(results, null, 2))
