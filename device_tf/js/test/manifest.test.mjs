import assert from 'node:assert/strict';
import { test } from 'node:test';

import { readSchema } from '../src/bundle_node.mjs';
import { treeDigest } from '../src/digest.mjs';
import { ManifestError } from '../src/errors.mjs';
import { validateManifest } from '../src/manifest.mjs';

const t = (name, shape, layout, dtype = 'float32') => ({ name, shape, layout, dtype });
const slice = (name, side) => ({
  name,
  side,
  inputs: ['x'],
  outputs: ['y'],
  first_layer: 'l0',
  last_layer: 'l1',
  num_params: 1,
  artifacts: [],
});
const manifest = () => ({
  format_version: 1,
  model: 'm',
  spliteasy_version: '0.1.0',
  split_mode: 'double',
  label_holder: 'device',
  input: t('image', [null, 8, 8, 1], 'NHWC'),
  labels: t('labels', [null], 'N', 'int32'),
  output: t('logits', [null, 10], 'NC'),
  cuts: [t('a_out', [null, 8, 8, 16], 'NHWC'), t('b_out', [null, 4, 4, 32], 'NHWC')],
  slices: [slice('A', 'device'), slice('B', 'server'), slice('C', 'device')],
  loss: { name: 'sparse_categorical_crossentropy', from_logits: true },
  optimizer: { name: 'adam', learning_rate: 0.001, beta_1: 0.9, beta_2: 0.999, epsilon: 1e-7 },
  num_classes: 10,
  artifacts: [],
});

test('a valid manifest passes the exported schema', async () => {
  const schema = await readSchema();
  assert.equal(validateManifest(JSON.stringify(manifest()), schema).model, 'm');
});

test('schema and cross-field rules refuse bad manifests', async () => {
  const schema = await readSchema();
  const bad = (mutate, pattern) => {
    const m = manifest();
    mutate(m);
    assert.throws(() => validateManifest(m, schema), (e) => e instanceof ManifestError && pattern.test(e.message));
  };
  bad((m) => (m.extra = 1), /extra/);
  bad((m) => (m.optimizer = { name: 'rmsprop', learning_rate: 1 }), /optimizer/);
  bad((m) => (m.optimizer.learning_rate = 0), /optimizer/);
  bad((m) => (m.cuts[0].dtype = 'float64'), /cuts/);
  bad((m) => delete m.num_classes, /num_classes/);
  bad((m) => (m.split_mode = 'single'), /single split needs slices/);
  bad((m) => (m.cuts[0].shape = [4, 8, 8, 16]), /free batch dimension/);
  bad((m) => (m.cuts[0].layout = 'NC'), /needs rank 2/);
  bad((m) => (m.slices[2].side = 'server'), /slice C runs on the device/);
  assert.throws(() => validateManifest('{nope', schema), /not JSON/);
});

test('tree digest sorts paths part by part, as pathlib does', async () => {
  const enc = new TextEncoder();
  const files = new Map([
    ['a-b', enc.encode('1')],
    ['a/b', enc.encode('2')],
  ]);
  // pathlib order: a/b (parts ['a','b']) before a-b; string order would flip them.
  const swapped = new Map([...files].reverse());
  assert.equal(await treeDigest(files), await treeDigest(swapped));
});

test('the pure-JS SHA-256 (pages without WebCrypto) equals WebCrypto', async () => {
  const { sha256 } = await import('../src/digest.mjs');
  const hex = (b) => Array.from(b, (v) => v.toString(16).padStart(2, '0')).join('');
  for (const n of [0, 1, 55, 56, 63, 64, 65, 1000, 100003]) {
    const data = Uint8Array.from({ length: n }, (_, i) => (i * 31 + 7) & 255);
    const ref = hex(new Uint8Array(await crypto.subtle.digest('SHA-256', data)));
    assert.equal(hex(sha256(data)), ref, `length ${n}`);
  }
});
