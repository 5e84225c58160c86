// Loads the napi addon built from crates/biflow-node (see scripts/build-native.mjs).
import {createRequire} from 'node:module'

export interface CancelToken {
  cancel(): void
}

export interface Native {
  CancelToken: new () => CancelToken
  runJob(name: string, optionsJson: string, onEvent?: (eventJson: string) => void, token?: CancelToken): Promise<string>
  coreVersion(): string
}

let cached: Native | undefined

export function native(): Native {
  if (!cached) {
    const require = createRequire(import.meta.url)
    try {
      cached = require('../../native/biflow.node') as Native
    } catch (error) {
      throw new Error(
        `the biflow native core is not built (${(error as Error).message.split('\n')[0]}); run \`npm run build\` in the biflow folder`,
      )
    }
  }

  return cached
}
