// The long run of the fuzz tests (crates/biflow-core/tests/fuzz): every reader of user bytes gets
// structure-aware mutated inputs for N minutes instead of the fixed number `cargo test` runs.
//   npm run fuzz -- --minutes 20 [--seed S] [--threads T] [READER_TEST_NAME_FILTER]
// Prints each reader's line (cases, accepted, refused, crashed) and a summary; exits non-zero on a crash.
// Crashing inputs are saved to target/fuzz-crashes/; keep each (small) one in fixtures/fuzz/<reader>/.
import {spawn} from 'node:child_process'
import {dirname, join} from 'node:path'
import {fileURLToPath} from 'node:url'

const root = join(dirname(fileURLToPath(import.meta.url)), '..')
const args = process.argv.slice(2)
let minutes = 20
let seed
let threads = 1
const filters = []
for (let i = 0; i < args.length; i++) {
  const a = args[i]
  if (a === '--minutes') minutes = Number(args[++i])
  else if (a === '--seed') seed = args[++i]
  else if (a === '--threads') threads = Number(args[++i])
  else if (a === '--help' || a === '-h') {
    console.log('usage: npm run fuzz -- --minutes N [--seed S] [--threads T] [test name filter]')
    process.exit(0)
  } else filters.push(a)
}
if (!(minutes > 0)) {
  console.error('--minutes must be a positive number')
  process.exit(2)
}
const env = {...process.env, BIFLOW_FUZZ_SECONDS: String(minutes * 60)}
if (seed !== undefined) env.BIFLOW_FUZZ_SEED = String(seed)
const cargoArgs = ['test', '--release', '-p', 'biflow-core', '--test', 'fuzz', '--', '--nocapture', `--test-threads=${threads}`, ...filters]
console.error(`fuzz: ${minutes} min per reader, ${threads} at a time: cargo ${cargoArgs.join(' ')}`)
const child = spawn('cargo', cargoArgs, {cwd: root, env, stdio: ['ignore', 'pipe', 'pipe']})
const lines = []
const forward = (stream, out) => {
  let rest = ''
  stream.on('data', (chunk) => {
    rest += chunk
    const parts = rest.split('\n')
    rest = parts.pop()
    for (const l of parts) {
      if (/^fuzz \S+: \d+ cases/.test(l)) lines.push(l)
      out.write(l + '\n')
    }
  })
}
forward(child.stdout, process.stdout)
forward(child.stderr, process.stderr)
child.on('close', (code) => {
  console.log('\ncases per reader:')
  let total = 0
  for (const l of lines) {
    const m = /^fuzz (\S+): (\d+) cases in ([\d.]+) s \((\d+) accepted, (\d+) refused, (\d+) crashed\)/.exec(l)
    if (!m) continue
    total += Number(m[2])
    console.log(`  ${m[1].padEnd(12)} ${m[2].padStart(10)} cases in ${Number(m[3]).toFixed(0).padStart(5)} s, ${m[6]} crashed`)
  }
  console.log(`  ${'total'.padEnd(12)} ${String(total).padStart(10)} cases`)
  process.exit(code ?? 1)
})
