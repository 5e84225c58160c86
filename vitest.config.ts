import {defineConfig} from 'vitest/config'

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 120_000,
    hookTimeout: 120_000,
    // The CLI tests spawn release builds that use every core; run files one at a time.
    fileParallelism: false,
  },
})
