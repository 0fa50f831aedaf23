/**
 * The static imports of one of our ES modules, found and rewritten as text: what the page's
 * worker loader (worker_boot.mjs) needs, because browsers do not apply a page's import map
 * to its workers. Handles the forms src/ uses -- `import ... from '...'`, `export ... from
 * '...'` and `import '...'` at the start of a line, a multi-line `import {\n ...\n} from '...'`
 * included. Dynamic `import('...')` is left as it is (transport.mjs loads Node's 'ws' so,
 * never in a page). test/module_imports.test.mjs checks that this finds every import of every module
 * in src/, so a module written another way fails a test rather than the page.
 */

const STATEMENT = /^([ \t]*(?:(?:import|export|\})[^\n'"]*?\bfrom\s*|import\s*))(['"])([^'"\n]+)\2/gm;

/** The specifiers `src` imports, in order, each once. */
export function importSpecifiers(src) {
  return [...new Set([...src.matchAll(STATEMENT)].map((m) => m[3]))];
}

/** `src` with each import specifier replaced by `to(spec)`. */
export function rewriteImports(src, to) {
  return src.replace(STATEMENT, (all, head, quote, spec) => `${head}${quote}${to(spec)}${quote}`);
}
