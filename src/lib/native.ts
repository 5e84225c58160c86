// Loads the napi addon built from crates/biflow-node by @napi-rs/cli (`npm run build:native`): native/ holds
// the platform's .node file, napi's generated loader (index.cjs, which picks the right file for this
// platform) and its TypeScript declarations (index.d.cts), used here instead of an untyped require.
import {createRequire} from 'node:module'

import type * as Binding from '../../native/index.cjs'

export type Native = typeof Binding
export type CancelToken = Binding.CancelToken

let cached: Native | undefined

export function native(): Native {
  if (!cached) {
    const require = createRequire(import.meta.url)
    try {
      cached = require('../../native/index.cjs') as Native
    } catch (error) {
      // napi's loader chains the failure of each candidate file through `cause`.
      const err = error as Error
      const messages: string[] = []
      for (let e: unknown = err; e && messages.length < 64; e = (e as {cause?: unknown}).cause) messages.push(String((e as Error).message ?? e))
      const text = messages.join('\n')
      const cudaLib = /lib(cuda|cudart|cublas|cublasLt|curand|nvrtc)\.so[.\d]*/.exec(text)
      if (cudaLib) {
        const fix = /^libcuda\.so/.test(cudaLib[0])
          ? 'install the NVIDIA driver (for CUDA 13.0 or newer)'
          : 'install the CUDA 13 libraries (or put them on LD_LIBRARY_PATH)'
        throw new Error(`this biflow was built with CUDA, but ${cudaLib[0]} cannot be loaded: ${fix}, or rebuild for the CPU with \`npm run build:native\``)
      }

      throw new Error(`the biflow native core is not built (${err.message.split('\n')[0]}); run \`npm run build\` in the biflow folder`)
    }
  }

  return cached
}
