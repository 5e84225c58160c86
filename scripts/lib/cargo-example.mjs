// Builds a biflow-core example (release) for the host's target triple and returns its path. The same
// --target as `napi build --platform` (npm ci) and CI's cargo test, so the compiled dependencies are
// shared rather than built a second time into target/release.
import {execFileSync, spawnSync} from 'node:child_process'
import {join} from 'node:path'

export function buildExample(root, name) {
  const host = /host: (\S+)/.exec(execFileSync('rustc', ['-vV'], {encoding: 'utf8'}))[1]
  execFileSync('cargo', ['build', '--release', '--target', host, '-p', 'biflow-core', '--example', name], {
    cwd: root,
    stdio: ['ignore', 'ignore', 'inherit'],
  })
  return join(process.env.CARGO_TARGET_DIR ?? join(root, 'target'), host, 'release', 'examples', name)
}

/** Build and run example `name` with this script's arguments; print its last JSON line as `benchmark`. */
export function runBenchExample(root, name, benchmark) {
  const run = spawnSync(buildExample(root, name), process.argv.slice(2), {cwd: root, encoding: 'utf8'})
  if (run.status !== 0) {
    process.stderr.write(run.stderr)
    process.exit(run.status ?? 1)
  }
  const result = JSON.parse(run.stdout.trim().split('\n').at(-1))
  console.log(JSON.stringify({benchmark, ...result}, null, 2))
}
