// `biflow report RUN` in a real browser: Debian's chromium (headless, no sandbox, fresh profile),
// driven by puppeteer-core, loads the self-contained page; every chart and image renders, nothing is
// fetched, no console error; a screenshot is kept as a test artifact (test-artifacts/report.png).
import {existsSync, mkdirSync, readFileSync, writeFileSync} from 'node:fs'
import {join} from 'node:path'
import {pathToFileURL} from 'node:url'
import puppeteer from 'puppeteer-core'
import {beforeAll, describe, expect, it} from 'vitest'

import {root, runJson, tempDir, toyDataset} from './helpers.js'

const candidates = [process.env.CHROMIUM_PATH, '/usr/bin/chromium', '/usr/bin/chromium-browser', '/usr/bin/google-chrome'].filter(Boolean) as string[]
const browserPath = candidates.find((p) => existsSync(p))
if (!browserPath) {
  console.warn('SKIPPING the browser test of biflow report: chromium is not installed (apt-get install -y chromium, or set CHROMIUM_PATH)')
}

let work: string
let g: string

beforeAll(async () => {
  work = tempDir('biflow-report-')
  const data = await toyDataset(work)
  const f = join(work, 'f')
  g = join(work, 'g')
  runJson(['train', '--data', data, '--out', f, '--patch-size', '2', '--channels', '64', '--blocks', '2', '--layers-per-block', '1', '--batch-size', '8', '--steps', '12', '--sample-every', '4'])
  runJson(['distill', '--forward', f, '--data', data, '--out', g, '--batch-size', '8', '--steps', '12', '--sample-every', '4'])
  writeFileSync(join(g, 'evaluation.json'), JSON.stringify({evalReverse: {reconstructionMse: 0.1, reconstructionPsnr: 16}, bpd: 3.2}))
})

describe('biflow report', () => {
  it('writes one self-contained page with curves, grids, both methods, evaluation and provenance', () => {
    const r = runJson<{report: string; compare: Record<string, unknown>}>(['report', g])
    expect(r.report).toBe(join(g, 'report.html'))
    expect(Object.keys(r.compare).sort()).toEqual(['exact', 'reverse'])
    const html = readFileSync(r.report, 'utf8')
    // Nothing outside the page: every src is a data: URI, no scripts, no links to fetch.
    expect([...html.matchAll(/src="([^"]*)"/g)].every((m) => m[1].startsWith('data:'))).toBe(true)
    expect(html).not.toMatch(/<script|<link|https?:\/\/(?!www\.w3\.org)/)
    for (const s of ['Evaluation', 'MSE 0.10000, PSNR 16.00 dB', 'Other results', 'Training curves', 'Samples during training', 'step 12', 'reverse: learned G', 'exact: causal decoding', 'Provenance', 'dataset manifest checksum', 'forward run', 'biflow distill --forward', 'Configuration']) {
      expect(html, s).toContain(s)
    }
  })

  it.skipIf(!browserPath)('renders in headless chromium: every chart and image has a size, no console errors, no requests', async () => {
    const profile = tempDir('biflow-chromium-profile-')
    const browser = await puppeteer.launch({
      executablePath: browserPath,
      headless: true,
      args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', `--user-data-dir=${profile}`],
    })
    try {
      const page = await browser.newPage()
      const errors: string[] = []
      const requests: string[] = []
      page.on('console', (m) => m.type() === 'error' && errors.push(m.text()))
      page.on('pageerror', (e) => errors.push(String(e)))
      page.on('request', (req) => !req.url().startsWith('data:') && !req.url().startsWith('file:') && requests.push(req.url()))
      await page.setViewport({width: 1200, height: 900})
      await page.goto(pathToFileURL(join(g, 'report.html')).href, {waitUntil: 'load'})
      const images = await page.$$eval('img', (imgs) =>
        imgs.map((i) => ({alt: i.alt, complete: i.complete, w: i.naturalWidth, h: i.naturalHeight, shown: i.getBoundingClientRect().width})),
      )
      const charts = images.filter((i) => /loss|bits|learning|throughput|gradNorm|recon|align/.test(i.alt))
      expect(charts.length).toBeGreaterThanOrEqual(4)
      expect(images.filter((i) => /^step /.test(i.alt)).length).toBe(3)
      expect(images.some((i) => i.alt.startsWith('reverse')) && images.some((i) => i.alt.startsWith('exact'))).toBe(true)
      for (const i of images) {
        expect(i.complete && i.w > 0 && i.h > 0 && i.shown > 0, `${i.alt}: ${JSON.stringify(i)}`).toBe(true)
      }

      expect(errors).toEqual([])
      expect(requests).toEqual([])
      mkdirSync(join(root, 'test-artifacts'), {recursive: true})
      await page.screenshot({path: join(root, 'test-artifacts', 'report.png'), fullPage: true})
      expect(existsSync(join(root, 'test-artifacts', 'report.png'))).toBe(true)
    } finally {
      await browser.close()
    }
  })
})
