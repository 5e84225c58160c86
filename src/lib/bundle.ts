// Model bundles as .tar.gz through npm `tar`: packing the files the core staged, and unpacking only
// after every entry was checked (no absolute paths, no `..`, no links or devices, nothing unexpected).
import {existsSync, mkdtempSync, readdirSync, renameSync, rmSync, statSync} from 'node:fs'
import {tmpdir} from 'node:os'
import {basename, dirname, join, posix, resolve} from 'node:path'
import * as tar from 'tar'

import {native} from './native.js'

/** What a bundle may contain: the core's list (bundle.json and jobs/bundle.rs ALLOWED), and their folders. */
let layout: {files: Set<string>; dirs: Set<string>} | undefined
function bundleLayout(): {files: Set<string>; dirs: Set<string>} {
  if (!layout) {
    const files = JSON.parse(native().bundleFiles()) as string[]
    layout = {files: new Set(files), dirs: new Set(files.filter((f) => f.includes('/')).map((f) => posix.dirname(f)))}
  }

  return layout
}

/** A temporary folder next to `near` (same file system, so a rename can move it into place). */
export function tempNear(near: string, tag: string): string {
  const parent = dirname(resolve(near))
  return mkdtempSync(join(existsSync(parent) ? parent : tmpdir(), `.${basename(near)}.${tag}-`))
}

/** Pack `files` (relative to `cwd`) into a gzipped tar at `out`, written under a temporary name first. */
export async function pack(cwd: string, files: string[], out: string): Promise<void> {
  const tmp = `${out}.tmp-${process.pid}`
  try {
    await tar.create({gzip: true, file: tmp, cwd, portable: true, noDirRecurse: true}, files)
    renameSync(tmp, out)
  } catch (error) {
    rmSync(tmp, {force: true})
    throw error
  }
}

/** Why an entry may not be unpacked (undefined: it may). */
export function entryProblem(path: string, type: string): string | undefined {
  if (path.startsWith('/') || path.startsWith('\\') || /^[A-Za-z]:/.test(path)) return `an absolute path ('${path}')`
  const parts = path.split(/[\\/]+/)
  if (parts.includes('..')) return `a path leaving the bundle ('${path}')`
  const clean = posix.normalize(path.replaceAll('\\', '/')).replace(/\/$/, '').replace(/^\.\//, '')
  const {files, dirs} = bundleLayout()
  if (type === 'Directory') return dirs.has(clean) || clean === '.' ? undefined : `an unexpected folder ('${path}')`
  if (type !== 'File' && type !== 'OldFile' && type !== 'ContiguousFile') return `a ${type} entry ('${path}'): only plain files are allowed`
  if (!files.has(clean)) return `an unexpected file ('${path}')`
  return undefined
}

/** Every entry of the archive (path, type), read without writing anything. */
export async function listEntries(file: string): Promise<{path: string; type: string}[]> {
  const entries: {path: string; type: string}[] = []
  await tar.list({
    file,
    strict: true,
    onReadEntry(entry) {
      entries.push({path: entry.path, type: entry.type})
      entry.resume()
    },
  })
  return entries
}

/**
 * Check every entry of `file`, then unpack it into a fresh folder next to `out` and return that
 * folder; throws (having written nothing) on the first refused entry.
 */
export async function checkAndUnpack(file: string): Promise<{staging: (near: string) => Promise<string>}> {
  let entries
  try {
    entries = await listEntries(file)
  } catch (error) {
    throw new Error(`${file} is not a readable .tar.gz bundle (${(error as Error).message})`)
  }

  if (entries.length === 0) throw new Error(`${file} is empty: not a biflow bundle`)
  const seen = new Set<string>()
  for (const e of entries) {
    const problem = entryProblem(e.path, e.type)
    if (problem) throw new Error(`refusing the bundle ${file}: it holds ${problem}; nothing was written`)
    const key = posix.normalize(e.path)
    if (e.type !== 'Directory' && seen.has(key)) throw new Error(`refusing the bundle ${file}: '${e.path}' appears twice; nothing was written`)
    seen.add(key)
  }

  return {
    async staging(near: string) {
      const dir = tempNear(near, 'import')
      try {
        await tar.extract({file, cwd: dir, strict: true, preservePaths: false, filter: (p, entry) => entryProblem(p, (entry as tar.ReadEntry).type ?? 'File') === undefined})
      } catch (error) {
        rmSync(dir, {recursive: true, force: true})
        throw error
      }

      return dir
    },
  }
}
