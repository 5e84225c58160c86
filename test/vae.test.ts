import {existsSync, mkdirSync, writeFileSync} from 'node:fs'
import {join} from 'node:path'

import {beforeAll, describe, expect, it} from 'vitest'

import {fixtures, runCli, runJson, tempDir, writeGreyPng} from './helpers.js'

// A small random AutoencoderKL in the diffusers layout (fixtures/vae, parity-tested against diffusers in
// the core): the latents are not meaningful, but the commands, their files and their errors are the real ones.
describe('biflow vae encode / decode', () => {
  const work = tempDir()
  const vae = join(fixtures, 'vae', 'tiny-random')
  const images = join(work, 'images')

  beforeAll(() => {
    mkdirSync(images)
    writeGreyPng(join(images, 'a.png'), 16, (x, y) => (x * 16 + y) % 256)
    writeGreyPng(join(images, 'b.png'), 16, (x) => x * 16)
  })

  it('encodes a folder to training-scaled latents and decodes them to PNGs', () => {
    const lat = join(work, 'lat.npy')
    const enc = runJson<{shape: number[]; scaling: number; posterior: string}>(['vae', 'encode', images, '--vae', vae, '--out', lat])
    expect(enc).toMatchObject({shape: [2, 4, 8, 8], scaling: 0.18215, posterior: 'mean'})
    expect(runCli(['vae', 'encode', images, '--vae', vae, '--out', lat]).stderr).toMatch(/exists.*--force/s)
    const out = join(work, 'decoded')
    const dec = runJson<{num: number; shape: number[]; files: string[]}>(['vae', 'decode', lat, '--vae', vae, '--out', out])
    expect(dec).toMatchObject({num: 2, shape: [2, 3, 16, 16]})
    expect(existsSync(join(out, '000001.png')) && existsSync(join(out, 'grid.png'))).toBe(true)
  })

  it('prepares a latent dataset (data prepare --vae) whose grid inspect decodes', () => {
    const out = join(work, 'latents')
    const r = runJson<{count: number; channels: number; height: number; latent: {imageShape: number[]; scalingFactor: number}}>(['data', 'prepare', images, '--out', out, '--size', '16', '--vae', vae])
    expect(r).toMatchObject({count: 2, channels: 4, height: 8, latent: {imageShape: [3, 16, 16], scalingFactor: 0.18215}})
    const inspected = runJson<{grid: string; latent: {vae: string}}>(['data', 'inspect', out])
    expect(existsSync(inspected.grid)).toBe(true)
    expect(inspected.latent.vae).toBe(vae)
    expect(runCli(['data', 'prepare', images, '--out', join(work, 'odd'), '--size', '15', '--vae', vae]).stderr).toMatch(/multiple of the VAE's downsampling/)
    expect(existsSync(join(work, 'odd'))).toBe(false)
  })

  it('refuses a folder that is not a VAE, images of a size it cannot take, and latents of the wrong shape', () => {
    const notVae = join(work, 'not-vae')
    mkdirSync(notVae)
    writeFileSync(join(notVae, 'config.json'), JSON.stringify({_class_name: 'UNet2DModel', block_out_channels: [8]}))
    const r = runCli(['vae', 'encode', images, '--vae', notVae, '--out', join(work, 'x.npy')])
    expect(r.code).not.toBe(0)
    expect(r.stderr).toMatch(/AutoencoderKL/)
    const odd = join(work, 'odd')
    mkdirSync(odd)
    writeGreyPng(join(odd, 'c.png'), 15, () => 0)
    expect(runCli(['vae', 'encode', odd, '--vae', vae, '--out', join(work, 'y.npy')]).stderr).toMatch(/multiples of 2/)
    expect(existsSync(join(work, 'y.npy'))).toBe(false)
    const images16 = runCli(['vae', 'decode', join(images, 'a.png'), '--vae', vae, '--out', join(work, 'z')])
    expect(images16.code).not.toBe(0)
  })
})
