// Does the learned inverse beat the exact one? `npm run bench:quality` (release build, about 1.5 hours on
// two cores with the defaults). Prepares builtin:mnist at 32 px, trains F with the demo's recipe, trains the
// offline judge, distills G, then judges both samplers of the same F from the same noise: at guidance 0 and
// temperature 1, and over a guidance sweep (each sampler's best guidance by FD_J). Prints one JSON object
// (last stdout line) with every phase's seconds; progress goes to stderr.
//
//   node scripts/bench-quality.mjs [--work DIR] [--f-steps 3000] [--g-steps 6000] [--num 1000]
//        [--guidances 0,1,2,3] [--seed 0] [--g-out NAME] [--skip-exact] -- [extra distill flags]
//   node scripts/bench-quality.mjs --ablations STEPS [--seeds 0,1] [--variants align,naive,...] [--work DIR] -- [extra distill flags]
//
// The second form is the paper's ablations on the same F and judge: hidden alignment (the default), naive
// distillation, score-based instead of learned denoising, no reverse-side RMS norm, and training-time
// guidance off (--cfg-range 0,0), each distilled for STEPS steps per seed and judged at guidance 0.
//
// Runs are reused: a complete F, judge or G in WORK (default bench-quality/, git-ignored) is not trained
// again, an interrupted one resumes, so the same command after Ctrl-C continues. --g-out names G's folder
// inside WORK (default g) so several distillation settings can be judged against one F and judge.
import {execFileSync} from 'node:child_process'
import {existsSync, readFileSync} from 'node:fs'
import {cpus} from 'node:os'
import {dirname, join} from 'node:path'
import {fileURLToPath} from 'node:url'

const root = join(dirname(fileURLToPath(import.meta.url)), '..')
const argv = process.argv.slice(2)
const dash = argv.indexOf('--')
const extra = dash >= 0 ? argv.slice(dash + 1) : []
const opts = dash >= 0 ? argv.slice(0, dash) : argv
const flag = (name, dflt) => {
  const i = opts.indexOf(`--${name}`)
  return i >= 0 ? opts[i + 1] : dflt
}
const work = flag('work', join(root, 'bench-quality'))
const fSteps = Number(flag('f-steps', '3000'))
const gSteps = Number(flag('g-steps', '6000'))
const num = Number(flag('num', '1000'))
const seed = Number(flag('seed', '0'))
const guidances = flag('guidances', '0,1,2,3').split(',').map(Number)
const gName = flag('g-out', 'g')
const skipExact = opts.includes('--skip-exact')

const data = join(work, 'mnist32')
const fDir = join(work, 'f')
const judge = join(work, 'judge')
const gDir = join(work, gName)

function biflow(args, {json = true} = {}) {
  console.error(`$ biflow ${args.join(' ')}`)
  const out = execFileSync(process.execPath, [join(root, 'bin/run.js'), ...args, ...(json ? ['--json'] : [])], {
    cwd: root,
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', 'inherit'],
    maxBuffer: 1 << 26,
  })
  return json ? JSON.parse(out) : out
}

const status = (dir) => (existsSync(join(dir, 'status.json')) ? JSON.parse(readFileSync(join(dir, 'status.json'), 'utf8')) : null)

/** Train or distill into `dir` unless it is complete; resume an interrupted run. */
function fit(command, dir, args) {
  const s = status(dir)
  if (s?.state === 'complete') return {reused: true, seconds: 0}
  const t = Date.now()
  if (existsSync(join(dir, 'config.json')) && s?.step > 0) biflow([command, '--out', dir, '--resume'])
  else biflow([command, '--out', dir, ...args])
  return {reused: false, seconds: (Date.now() - t) / 1000}
}

const phases = {}
let t = Date.now()
if (!existsSync(join(data, 'manifest.json'))) {
  biflow(['data', 'prepare', 'builtin:mnist', '--out', data, '--size', '32', '--val-fraction', '0.05'])
}
phases.prepare = (Date.now() - t) / 1000

// F: the demo's recipe, at 32 px (T = 64 tokens of 16 values).
phases.forward = fit('train', fDir, [
  '--data', data, '--steps', String(fSteps), '--channels', '128', '--blocks', '4', '--layers-per-block', '1',
  '--patch-size', '4', '--batch-size', '64', '--lr', '2e-3', '--noise-std', '0.1', '--clip-scale', '3', '--save-every', '500',
])

t = Date.now()
let judgeInfo
if (existsSync(join(judge, 'judge.json'))) judgeInfo = JSON.parse(readFileSync(join(judge, 'judge.json'), 'utf8'))
else judgeInfo = biflow(['judge', 'train', '--data', data, '--out', judge])
phases.judge = (Date.now() - t) / 1000

const ablationSteps = flag('ablations')
if (ablationSteps !== undefined) {
  const variants = {align: [], naive: ['--loss', 'naive'], 'score-denoise': ['--denoise', 'none'], 'no-norm': ['--align-norm', 'none'], 'no-cfg': ['--cfg-range', '0,0']}
  const seeds = flag('seeds', '0,1').split(',')
  const chosen = flag('variants', Object.keys(variants).join(',')).split(',')
  const rows = []
  for (const s of seeds) {
    for (const [name, flags] of Object.entries(variants).filter(([n]) => chosen.includes(n))) {
      const dir = join(work, `ab-${name}-s${s}`)
      const trained = fit('distill', dir, ['--forward', fDir, '--data', data, '--steps', ablationSteps, '--seed', s, '--save-every', '500', ...flags, ...extra])
      const q = biflow(['eval-quality', '--model', dir, '--judge', judge, '--data', data, '--num', String(num), '--seed', String(seed)])
      const row = {variant: name, seed: Number(s), fd: q.fd, labelAccuracy: q.labelAccuracy, precision: q.precision, recall: q.recall, diversityRatio: q.diversityRatio, distillSeconds: trained.seconds}
      console.error(JSON.stringify(row))
      rows.push(row)
    }
  }
  console.log(JSON.stringify({cpu: cpus()[0]?.model, work, steps: Number(ablationSteps), num, distillFlags: extra, phaseSeconds: phases, rows}))
  process.exit(0)
}

phases.distill = fit('distill', gDir, ['--forward', fDir, '--data', data, '--steps', String(gSteps), '--save-every', '500', ...extra])

t = Date.now()
const rows = []
for (const method of skipExact ? ['reverse'] : ['exact', 'reverse']) {
  for (const guidance of guidances) {
    const r = biflow([
      'eval-quality', '--model', gDir, '--method', method, '--judge', judge, '--data', data,
      '--guidance', String(guidance), '--temperature', '1', '--num', String(num), '--seed', String(seed),
    ])
    const row = {
      method, guidance, fd: r.fd, labelAccuracy: r.labelAccuracy, precision: r.precision, recall: r.recall,
      diversity: r.diversity, diversityRatio: r.diversityRatio, samplingSeconds: r.samplingSeconds,
    }
    console.error(JSON.stringify(row))
    rows.push(row)
  }
}
phases.judging = (Date.now() - t) / 1000

const at = (method, g) => rows.find((r) => r.method === method && r.guidance === g)
const best = (method) => rows.filter((r) => r.method === method).sort((a, b) => a.fd - b.fd)[0]
const g = JSON.parse(readFileSync(join(gDir, 'config.json'), 'utf8'))
const result = {
  cpu: cpus()[0]?.model, threads: cpus().length,
  work, num, seed, forwardSteps: fSteps, distillSteps: gSteps, distillFlags: extra, distillOptions: g.train,
  judge: {heldOutAccuracy: judgeInfo.heldOutAccuracy},
  rows,
  guidance0: {exact: at('exact', 0), reverse: at('reverse', 0)},
  best: {exact: best('exact'), reverse: best('reverse')},
  phaseSeconds: phases,
}
if (!skipExact) {
  const [e0, r0, eb, rb] = [result.guidance0.exact, result.guidance0.reverse, result.best.exact, result.best.reverse]
  result.verdict = {
    fdRatioAtGuidance0: r0.fd / e0.fd,
    fdRatioAtBestGuidance: rb.fd / eb.fd,
    labelAccuracyAtGuidance0: {reverse: r0.labelAccuracy, exact: e0.labelAccuracy},
    recallRatioAtGuidance0: r0.recall / e0.recall,
    reverseWins: r0.fd <= e0.fd && r0.labelAccuracy >= e0.labelAccuracy && r0.recall >= 0.8 * e0.recall && rb.fd <= eb.fd,
  }
}
console.log(JSON.stringify(result))
