#!/usr/bin/env node
// VAE benchmark (release build): images/s of encoding and decoding with the full SD-VAE configuration (random
// weights) at 256 px, batch 8, on the CPU, with the f32 matmul ceiling of the same run. Prints one JSON object.
// diffusers side by side: python scripts/bench-vae-diffusers.py (same arguments).
// Usage: npm run bench:vae [-- --size 256 --batch 8 --rounds 1]
import {dirname, join} from 'node:path'
import {fileURLToPath} from 'node:url'

import {runBenchExample} from './lib/cargo-example.mjs'

runBenchExample(join(dirname(fileURLToPath(import.meta.url)), '..'), 'bench_vae', 'vae')
