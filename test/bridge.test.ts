import {describe, expect, it} from 'vitest'

import {runCli, runCliInterrupted} from './helpers.js'

describe('the native bridge', () => {
  it('shows help that lists the commands', () => {
    const r = runCli(['--help'])
    expect(r.code).toBe(0)
    expect(r.stdout).toMatch(/USAGE/)
    expect(r.stdout).toMatch(/data/)
  })

  it('runs a core job and returns its typed result as JSON', () => {
    const r = runCli(['selftest', '--steps', '5', '--sleep-ms', '0', '--json'])
    expect(r.code).toBe(0)
    expect(JSON.parse(r.stdout)).toEqual({steps: 5})
    // --json streams progress events as JSON lines on stderr
    const events = r.stderr.trim().split('\n').map((l) => JSON.parse(l))
    expect(events.filter((e) => e.type === 'progress')).toHaveLength(5)
    expect(events.at(-1)).toMatchObject({type: 'end', phase: 'echo'})
  })

  it('turns a Rust error into a message and a non-zero exit', () => {
    const r = runCli(['selftest', '--steps', '1', '--fail', 'the disk is on fire'])
    expect(r.code).toBe(1)
    expect(r.stderr).toContain('the disk is on fire')
  })

  it('turns a Rust panic into an error instead of aborting', () => {
    const r = runCli(['selftest', '--steps', '1', '--panic'])
    expect(r.code).toBe(1)
    expect(r.stderr).toContain('internal error (panic): echo job asked to panic')
  })

  it('cancels a running job on Ctrl-C and exits non-zero', async () => {
    const r = await runCliInterrupted(['selftest', '--steps', '100000', '--sleep-ms', '5', '--json'], /"progress"/)
    expect(r.code, r.stderr + r.stdout).toBe(130)
    // with --json the error is the JSON object on stdout
    expect(JSON.parse(r.stdout).error.message).toMatch(/cancelled by the user/)
  })
})
