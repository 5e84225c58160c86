// Builds the napi addon (crates/biflow-node) in release mode and places it at native/biflow.node.
import {execFileSync} from 'node:child_process'
import {copyFileSync, mkdirSync} from 'node:fs'
import {dirname, join} from 'node:path'
import {fileURLToPath} from 'node:url'

const root = join(dirname(fileURLToPath(import.meta.url)), '..')
execFileSync('cargo', ['build', '--release', '-p', 'biflow-node'], {cwd: root, stdio: 'inherit'})
const lib = {darwin: 'libbiflow_node.dylib', win32: 'biflow_node.dll'}[process.platform] ?? 'libbiflow_node.so'
const targetDir = process.env.CARGO_TARGET_DIR ?? join(root, 'target')
mkdirSync(join(root, 'native'), {recursive: true})
copyFileSync(join(targetDir, 'release', lib), join(root, 'native', 'biflow.node'))
console.error('native addon: native/biflow.node')
