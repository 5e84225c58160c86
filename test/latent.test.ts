import {cpSync, existsSync, readFileSync, readdirSync, renameSync, writeFileSync} from 'node:fs'
import {join} from 'node:path'

import {beforeAll, describe, expect, it} from 'vitest'

import {native} from '../src/lib/native.js'
import {fixtures, runCli, runJson, tempDir, writeGreyPng} from './helpers.js'

/** Width, height and PNG colour type (0 grey, 2 RGB) from a PNG's IHDR. */
function pngInfo(path: string): {width: number; height: number; colour: number} {
  const b = readFileSync(path)
  expect(b.subarray(1, 4).toString()).toBe('PNG')
  return {width: b.readUInt32BE(16), height: b.readUInt32BE(20), colour: b[25]}
}

/** The shape in a .npy header. */
function npyShape(path: string): number[] {
  const header = readFileSync(path).subarray(10, 128).toString('latin1')
  return header.match(/'shape': \(([^)]*)\)/)![1].split(',').filter((s) => s.trim()).map(Number)
}

// The latent pipeline end to end on MNIST digits through a small random AutoencoderKL (fixtures/vae,
// parity-tested against diffusers in the core): 16x16 RGB images <-> 4x8x8 latents. The latents
// mean nothing, but every command, file, shape and error is the real one.
describe('the latent pipeline: prepare -> train -> distill -> sample -> eval-fid', () => {
  const work = tempDir()
  // A copy, so the tests can take it away and change it.
  const vae = join(work, 'vae')
  const data = join(work, 'latents')
  const [f, g] = [join(work, 'f'), join(work, 'g')]
  const tiny = ['--channels', '64', '--blocks', '2', '--layers-per-block', '1', '--batch-size', '32']

  beforeAll(() => {
    cpSync(join(fixtures, 'vae', 'tiny-random'), vae, {recursive: true})
    runJson(['data', 'prepare', 'builtin:mnist', '--out', data, '--size', '16', '--limit', '400', '--val-fraction', '0.1', '--vae', vae])
  }, 120_000)

  it('trains F on latents: the run records the VAE, its previews are decoded images', () => {
    const r = runJson<{steps: number; bpd: number}>(['train', '--data', data, '--out', f, ...tiny, '--patch-size', '2', '--steps', '30', '--sample-every', '30'])
    expect(r.steps).toBe(30)
    expect(Number.isFinite(r.bpd)).toBe(true)
    const config = JSON.parse(readFileSync(join(f, 'config.json'), 'utf8'))
    const manifest = JSON.parse(readFileSync(join(data, 'manifest.json'), 'utf8'))
    expect(config.model).toMatchObject({inChannels: 4, imgSize: 8})
    expect(config.latent).toEqual(manifest.latent)
    expect(config.latent.vae).toBe(vae)
    // 16 decoded 16x16 RGB previews in a 4x4 grid (2 px borders): not 8x8 latents.
    expect(pngInfo(join(f, 'samples', 'step-30.png'))).toEqual({width: 4 * 16 + 5 * 2, height: 4 * 16 + 5 * 2, colour: 2})
    expect(runJson<{runs: {space: string; kind: string}[]}>(['runs', f]).runs[0]).toMatchObject({space: 'latents', kind: 'forward'})
    expect(runCli(['runs', f]).stdout).toContain('forward (latents)')
    const bpd = runJson<{bpd: number; values: string; num: number}>(['eval-bpd', '--model', f, '--data', data])
    expect(bpd).toMatchObject({values: 'latents', num: 40})
    expect(Number.isFinite(bpd.bpd)).toBe(true)
  }, 120_000)

  it('distills G on latents, samples decoded images (or latents) and scores them by FID at pixel level', () => {
    runJson(['distill', '--forward', f, '--data', data, '--out', g, '--batch-size', '32', '--steps', '30', '--sample-every', '30'])
    expect(JSON.parse(readFileSync(join(g, 'config.json'), 'utf8')).latent.vaeSha256).toMatch(/^[0-9a-f]{64}$/)
    expect(pngInfo(join(g, 'samples', 'step-30.png')).width).toBe(74)
    // The report names the VAE and shows decoded grids (data-URI PNGs).
    const report = readFileSync(join(g, 'report.html'), 'utf8')
    expect(report).toContain('VAE weights (sha256)')
    expect(report).toContain(JSON.parse(readFileSync(join(g, 'config.json'), 'utf8')).latent.vaeSha256)
    expect(report).toMatch(/data:image\/png;base64,/)

    const png = runJson<{num: number; files: string[]}>(['sample', '--model', g, '--num', '6', '--out', join(work, 'png')])
    expect(png.num).toBe(6)
    expect(readdirSync(join(work, 'png')).filter((n) => /^\d{6}\.png$/.test(n))).toHaveLength(6)
    expect(pngInfo(join(work, 'png', '000005.png'))).toEqual({width: 16, height: 16, colour: 2})
    runJson(['sample', '--model', g, '--num', '6', '--format', 'npy', '--out', join(work, 'npy')])
    expect(npyShape(join(work, 'npy', 'samples.npy'))).toEqual([6, 3, 16, 16])
    runJson(['sample', '--model', g, '--num', '6', '--format', 'latent', '--out', join(work, 'lat')])
    expect(npyShape(join(work, 'lat', 'latents.npy'))).toEqual([6, 4, 8, 8])
    // The exact inverse of F decodes through the VAE too.
    runJson(['sample', '--model', f, '--num', '2', '--out', join(work, 'exact')])
    expect(pngInfo(join(work, 'exact', '000001.png')).width).toBe(16)
    // Nothing to keep on a pixel run, and nothing else: a clear error.
    expect(runCli(['sample', '--model', g, '--format', 'tiff', '--out', join(work, 'x')]).code).not.toBe(0)

    const weights = join(work, 'inception.safetensors')
    runJson(['fid', 'formula-weights', weights])
    const fid = runJson<{fid: number; source: {images: number; kind: string}; reference: {images: number; kind: string}}>([
      'eval-fid', g, data, '--num', '24', '--inception-weights', weights,
    ])
    expect(Number.isFinite(fid.fid) && fid.fid >= 0).toBe(true)
    expect(fid.source).toMatchObject({kind: 'run', images: 24})
    expect(fid.reference.kind).toBe('dataset')

    const ev = runJson<{reconstructionMse: number; reconstructionPsnr: number | null; values: string}>(['eval-reverse', '--model', g, '--data', data, '--limit', '16', '--num-exact', '2'])
    expect(ev).toMatchObject({values: 'latents', reconstructionPsnr: null})
    expect(Number.isFinite(ev.reconstructionMse)).toBe(true)
  }, 300_000)

  it('distills with perceptual terms on DECODED images: the gradient goes through the VAE decoder', async () => {
    const vgg = join(work, 'vgg.safetensors')
    await native().runJob('lpips.formulaWeights', JSON.stringify({output: vgg}))
    const gp = join(work, 'gp')
    runJson(['distill', '--forward', f, '--data', data, '--out', gp, '--batch-size', '16', '--steps', '6',
      '--lpips', join(fixtures, 'lpips', 'vgg-lin-v0.1.pth'), '--vgg', vgg, '--convnext', join(fixtures, 'convnext', 'tiny-random'), '--perceptual-size', '32'])
    const lines = readFileSync(join(gp, 'metrics.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l))
    expect(lines).toHaveLength(6)
    for (const term of ['lpips', 'convnext']) expect(lines.every((l) => Number.isFinite(l[term]) && l[term] > 0), term).toBe(true)
    // 16x16 decoded images are the smallest LPIPS takes; the 8x8 latents themselves would be refused.
    const tooSmall = runCli(['distill', '--forward', f, '--data', data, '--out', join(work, 'gp2'), '--steps', '2',
      '--lpips', join(fixtures, 'lpips', 'vgg-lin-v0.1.pth'), '--vgg', vgg, '--perceptual-size', '8'])
    expect(tooSmall.stderr).toMatch(/at least 16x16/)
  }, 300_000)

  it('edits an image through the VAE: encoded, edited in noise space, decoded', () => {
    const img = join(work, 'digit.png')
    writeGreyPng(img, 16, (x, y) => (Math.abs(x - 8) < 3 && y > 2 && y < 13 ? 255 : 0))
    const mask = join(work, 'mask.png')
    writeGreyPng(mask, 16, (_x, y) => (y < 8 ? 0 : 255))
    const r = runJson<{files: string[]; kind: string}>(['edit', '--model', g, '--image', img, '--mask', mask, '--num', '2', '--out', join(work, 'edit')])
    expect(r.kind).toBe('inpaint')
    expect(pngInfo(join(work, 'edit', 'edit-001.png'))).toEqual({width: 16, height: 16, colour: 2})
    // The latent grid is 8x8: an image of that size is not what the run edits.
    const small = join(work, 'small.png')
    writeGreyPng(small, 8, () => 0)
    expect(runCli(['edit', '--model', g, '--image', small, '--to-class', '1', '--out', join(work, 'e2')]).stderr).toMatch(/16x16/)
  }, 120_000)

  it('exports a latent run with its VAE or naming it, and imports either (the VAE asked for when absent)', () => {
    const original = join(work, 'orig')
    runJson(['sample', '--model', g, '--num', '4', '--format', 'npy', '--out', original])
    const same = (run: string, name: string) => {
      runJson(['sample', '--model', run, '--num', '4', '--format', 'npy', '--out', join(work, name)])
      expect(readFileSync(join(work, name, 'samples.npy')).equals(readFileSync(join(original, 'samples.npy')))).toBe(true)
    }

    const carried = join(work, 'with-vae.tar.gz')
    const e1 = runJson<{files: string[]}>(['export', g, '--out', carried, '--include-vae', '--no-preview'])
    expect(e1.files).toEqual(expect.arrayContaining(['vae/config.json', 'vae/diffusion_pytorch_model.safetensors', 'forward/weights.safetensors']))
    runJson(['import', 'bundle', carried, '--out', join(work, 'imported-a')])
    same(join(work, 'imported-a'), 'a')

    const named = join(work, 'named.tar.gz')
    const e2 = runJson<{files: string[]}>(['export', g, '--out', named, '--no-preview'])
    expect(e2.files.some((f) => f.startsWith('vae/'))).toBe(false)
    // On this machine the recorded VAE is where it was: the import finds it. Elsewhere (here: moved), it asks.
    renameSync(vae, `${vae}-away`)
    const asked = runCli(['import', 'bundle', named, '--out', join(work, 'imported-b')])
    expect(asked.stderr).toMatch(/names its VAE by checksum .* give its folder with --vae DIR/s)
    expect(existsSync(join(work, 'imported-b'))).toBe(false)
    runJson(['import', 'bundle', named, '--out', join(work, 'imported-b'), '--vae', `${vae}-away`])
    same(join(work, 'imported-b'), 'b')
    renameSync(`${vae}-away`, vae)
  }, 300_000)

  it('refuses pixels for a latent run and the reverse, another VAE, and a missing one, writing nothing', () => {
    const pixels = join(work, 'pixels')
    runJson(['data', 'prepare', 'builtin:mnist', '--out', pixels, '--size', '8', '--channels', '3', '--limit', '64'])
    // Resuming the latent run on pixels, distilling it on pixels, distilling a pixel F on latents.
    expect(runCli(['train', '--data', pixels, '--out', f, '--resume']).stderr).toMatch(/works on VAE latents and the data holds images/)
    const pf = join(work, 'pf')
    runJson(['train', '--data', pixels, '--out', pf, ...tiny, '--steps', '2'])
    const cross = runCli(['distill', '--forward', pf, '--data', data, '--out', join(work, 'g-cross'), '--steps', '2'])
    expect(cross.stderr).toMatch(/works on pixels and the dataset .* is a latent dataset/)
    expect(existsSync(join(work, 'g-cross'))).toBe(false)
    expect(runCli(['sample', '--model', pf, '--format', 'latent', '--out', join(work, 'x')]).stderr).toMatch(/run on pixels/)
    expect(runCli(['export', pf, '--out', join(work, 'px.tar.gz'), '--include-vae']).stderr).toMatch(/run on pixels, it has no VAE/)
    expect(existsSync(join(work, 'px.tar.gz'))).toBe(false)

    // Another VAE's weights under the recorded path, then no VAE there at all.
    const weights = join(vae, 'diffusion_pytorch_model.safetensors')
    const original = readFileSync(weights)
    writeFileSync(weights, Buffer.concat([original.subarray(0, original.length - 4), Buffer.from([1, 2, 3, 4])]))
    expect(runCli(['sample', '--model', g, '--out', join(work, 's-other')]).stderr).toMatch(/holds other weights .* give its folder with --vae/s)
    writeFileSync(weights, original)
    renameSync(vae, `${vae}-moved`)
    const missing = runCli(['sample', '--model', g, '--out', join(work, 's-missing')])
    expect(missing.stderr).toMatch(/which is not there: give its folder with --vae DIR/)
    expect(existsSync(join(work, 's-missing'))).toBe(false)
    // Training previews decode too: a new run without its VAE is refused before its folder exists.
    const blind = runCli(['train', '--data', data, '--out', join(work, 'f-blind'), ...tiny, '--patch-size', '2', '--steps', '2', '--sample-every', '1'])
    expect(blind.stderr).toMatch(/training on this latent dataset needs the VAE .* put it back to see previews/s)
    expect(existsSync(join(work, 'f-blind'))).toBe(false)
    // --vae names where it is now; --format latent needs none.
    expect(runJson<{num: number}>(['sample', '--model', g, '--num', '2', '--vae', `${vae}-moved`, '--out', join(work, 's-found')]).num).toBe(2)
    expect(runJson<{num: number}>(['sample', '--model', g, '--num', '2', '--format', 'latent', '--out', join(work, 's-lat')]).num).toBe(2)
    renameSync(`${vae}-moved`, vae)
  }, 300_000)
})
