// Build the native addon with @napi-rs/cli (run by `npm ci` through `prepare`). BIFLOW_CUDA=1 adds the
// cuda feature; without a CUDA toolkit on PATH (no nvcc), scripts/cuda-toolkit.sh installs CUDA 13.0's
// compiler and libraries from PyPI first, its environment is used for the build, and the addon records
// the toolkit's library folder (rpath) so that it runs without LD_LIBRARY_PATH.
import {execFileSync, spawnSync} from 'node:child_process'

const args = [
  'napi', 'build', '--platform', '--release',
  '--manifest-path', 'crates/biflow-node/Cargo.toml', '--package-json-path', 'package.json',
  '--output-dir', 'native', '--js', 'index.cjs', '--dts', 'index.d.cts',
]
const env = {...process.env}
if (process.env.BIFLOW_CUDA === '1') {
  args.push('--features', 'cuda')
  const hasNvcc = spawnSync('nvcc', ['--version'], {stdio: 'ignore'}).status === 0
  if (!hasNvcc) {
    const exports = execFileSync('bash', ['scripts/cuda-toolkit.sh'], {encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit']})
    const vars = execFileSync('bash', ['-c', `${exports}\nenv -0`], {encoding: 'utf8'})
    for (const kv of vars.split('\0')) {
      const i = kv.indexOf('=')
      if (i > 0) env[kv.slice(0, i)] = kv.slice(i + 1)
    }
    // The addon then finds cuBLAS, cuRAND and the runtime in the toolkit at run time; only the driver
    // (libcuda.so.1) must come from the system.
    env.RUSTFLAGS = [env.RUSTFLAGS, `-C link-arg=-Wl,-rpath,${env.CUDA_ROOT}/lib`].filter(Boolean).join(' ')
  }
  env.CUDA_COMPUTE_CAP ??= '90'
  console.error(`building the native addon with CUDA (compute capability ${env.CUDA_COMPUTE_CAP}; set CUDA_COMPUTE_CAP for another GPU)`)
}
const r = spawnSync('npx', args, {stdio: 'inherit', env})
process.exit(r.status ?? 1)
