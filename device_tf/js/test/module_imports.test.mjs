// The worker loader's import scanner (src/module_imports.mjs) must see every import of every
// module the page's worker may load: a missed one would leave a bare specifier the worker
// cannot resolve, or a relative one pointing nowhere from a blob URL.
import assert from 'node:assert/strict';
import { readFileSync, readdirSync } from 'node:fs';
import { test } from 'node:test';

import { importSpecifiers, rewriteImports } from '../src/module_imports.mjs';

const SRC = new URL('../src/', import.meta.url);

/**
 * Every static import's specifier: after `from`, or `import` directly followed by a string,
 * anywhere (a deliberately loose scan). Dynamic `import('...')` is left out: the loader does not
 * rewrite it (transport.mjs imports 'ws' that way, in Node only).
 */
function loose(src) {
  const code = src.replace(/\/\*[\s\S]*?\*\//g, '').replace(/^\s*\/\/.*$/gm, '');
  return [...new Set([...code.matchAll(/(?:\bfrom|\bimport)\s*(['"])([^'"\n]+)\1/g)].map((m) => m[2]))];
}

test('every import of every src module is found', () => {
  for (const name of readdirSync(SRC).filter((f) => f.endsWith('.mjs'))) {
    const src = readFileSync(new URL(name, SRC), 'utf8');
    assert.deepEqual(importSpecifiers(src).sort(), loose(src).sort(), name);
  }
});

test('import forms, rewritten', () => {
  const src = [
    "import * as tf from '@tensorflow/tfjs';",
    "import './layers.mjs';",
    'import {',
    '  a,',
    '  b,',
    "} from \"./x.mjs\";",
    "export { c } from './y.mjs';",
    "export const NOT_AN_IMPORT = './z.mjs';",
    "// a comment naming from './w.mjs' is left alone",
  ].join('\n');
  assert.deepEqual(importSpecifiers(src), ['@tensorflow/tfjs', './layers.mjs', './x.mjs', './y.mjs']);
  const out = rewriteImports(src, (s) => `blob:${s}`);
  assert.match(out, /import \* as tf from 'blob:@tensorflow\/tfjs';/);
  assert.match(out, /import 'blob:\.\/layers\.mjs';/);
  assert.match(out, /\} from "blob:\.\/x\.mjs";/);
  assert.match(out, /export \{ c \} from 'blob:\.\/y\.mjs';/);
  assert.match(out, /NOT_AN_IMPORT = '\.\/z\.mjs'/);
  assert.match(out, /from '\.\/w\.mjs' is left alone/);
});
