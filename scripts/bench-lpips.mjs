#!/usr/bin/env node
// LPIPS benchmark (release build): the distance and its gradient with respect to the first image at
// 224 px, batch 16, on the CPU, with the f32 matmul ceiling of the same run. Prints one JSON object.
// PyTorch's lpips package side by side: python scripts/bench-lpips-pytorch.py (same arguments).
// Usage: npm run bench:lpips [-- --size 224 --batch 16 --rounds 2]
import {dirname, join} from 'node:path'
import {fileURLToPath} from 'node:url'

import {runBenchExample} from './lib/cargo-example.mjs'

runBenchExample(join(dirname(fileURLToPath(import.meta.url)), '..'), 'bench_lpips', 'lpips')
