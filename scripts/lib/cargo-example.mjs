// Builds a biflow-core example (release) for the host's target triple and returns its path. The same
// --target as `napi build --platform` (npm ci) and CI's cargo test, so the compiled dependencies are
// shared rather than built a second time into target/release.
import {execFileSync} from 'node:child_process'
import {join} from 'node:path'

export function buildExample(root, name) {
  const host = /host: (\S+)/.exec(execFileSync('rustc', ['-vV'], {encoding: 'utf8'}))[1]
  execFileSync('cargo', ['build', '--release', '--target', host, '-p', 'biflow-core', '--example', name], {
    cwd: root,
    stdio: ['ignore', 'ignore', 'inherit'],
  })
  return join(process.env.CARGO_TARGET_DIR ?? join(root, 'target'), host, 'release', 'examples', name)
}
