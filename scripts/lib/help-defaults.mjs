// Parses an oclif `<cmd> --help` text into its flag names and the `[default: ...]` text each flag
// (and positional argument) shows. Shared by scripts/help-defaults.mjs (writes the fixture) and
// test/help.test.ts (checks against it), so both read the help the same way.

/** @typedef {{flags: string[], defaults: Record<string, string>, args: string[], argDefaults: Record<string, string>}} HelpDefaults */

/**
 * Flag sections (FLAGS, DEVICE FLAGS, GLOBAL FLAGS, ...) and ARGUMENTS of one help text.
 * @param {string} text
 * @returns {HelpDefaults}
 */
export function parseHelp(text) {
  /** @type {HelpDefaults} */
  const out = {flags: [], defaults: {}, args: [], argDefaults: {}}
  for (const {section, label, description} of entries(text)) {
    const shown = defaultText(description)
    if (section.endsWith('FLAGS')) {
      // `-o, --out=<value>` -> out; `--[no-]preview` keeps its [no-] (part of the flag's interface).
      const name = /--([^\s=]+)/.exec(label)?.[1]
      if (!name) throw new Error(`unreadable flag label: ${label}`)
      out.flags.push(name)
      if (shown !== undefined) out.defaults[name] = shown
    } else if (section === 'ARGUMENTS') {
      // `[DIR]` (optional) or `DIR` (required): the list keeps the brackets, the defaults key is the bare name.
      out.args.push(label)
      if (shown !== undefined) out.argDefaults[label.replace(/[[\].]/g, '')] = shown
    }
  }
  out.flags.sort()
  return out
}

/**
 * The entries (label and whitespace-normalised description) of every section, wrapped lines joined.
 * @param {string} text
 */
function entries(text) {
  /** @type {{section: string, label: string, parts: string[]}[]} */
  const found = []
  let section = ''
  /** @type {{section: string, label: string, parts: string[]} | undefined} */
  let entry
  // Colour codes would break the column matching (FORCE_COLOR in the environment turns them on).
  for (const line of text.replace(/\x1b\[[0-9;]*m/g, '').split('\n')) {
    // A new entry: label, 2+ spaces, description. Labels sit at indent 2, or 6 for `--x` flags beside
    // `-c, --x` ones (oclif aligns the long names); wrapped lines sit deeper, at the description column.
    const start = /^(?: {2}| {6}(?=--))(\S.*?)(?:\s{2,}(.*))?$/.exec(line)
    if (/^[A-Z][A-Z ]*$/.test(line)) {
      section = line.trim()
      entry = undefined
    } else if (start) {
      entry = {section, label: start[1], parts: [start[2] ?? '']}
      found.push(entry)
    } else if (entry && /^ {3,}\S/.test(line)) {
      entry.parts.push(line) // deeper indent: a wrapped line of the current entry
    } else {
      entry = undefined // a blank line ends the entry
    }
  }
  return found.map(({section, label, parts}) => ({section, label, description: parts.join(' ').replace(/\s+/g, ' ').trim()}))
}

/**
 * The text inside the first `[default: ...]` (brackets inside it balanced), or undefined.
 * @param {string} description
 */
function defaultText(description) {
  const at = description.indexOf('[default: ')
  if (at < 0) return undefined
  let depth = 0
  for (let i = at; i < description.length; i++) {
    if (description[i] === '[') depth++
    else if (description[i] === ']' && --depth === 0) return description.slice(at + '[default: '.length, i)
  }
  throw new Error(`unclosed [default: in: ${description}`)
}
