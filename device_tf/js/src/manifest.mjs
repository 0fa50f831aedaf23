/**
 * The bundle manifest on the JS side: validated against the JSON Schema exported from the
 * pydantic models (shared_schema/manifest.schema.json), so the device refuses exactly the
 * documents the server refuses. The few cross-field rules pydantic checks in code (and a
 * JSON Schema cannot say) are repeated here.
 */

import { Validator } from '@cfworker/json-schema';

import { ManifestError } from './errors.mjs';

export const MANIFEST_FILE = 'manifest.json';
// The manifest rules of shared_schema/protocol.json (test/protocol.test.mjs checks them).
export const LAYOUT_RANK = Object.freeze({ NHWC: 4, NCHW: 4, NC: 2, N: 1, NWC: 3 });
export const SPLIT_MODES = Object.freeze({
  double: Object.freeze({ slices: ['A', 'B', 'C'], cuts: 2, label_holder: 'device' }),
  single: Object.freeze({ slices: ['A', 'B'], cuts: 1, label_holder: 'server' }),
});
export const SLICE_SIDE = Object.freeze({ A: 'device', B: 'server', C: 'device' });

/** Parse and validate manifest text (or an object) against `schema`; returns the manifest. */
export function validateManifest(doc, schema, where = 'manifest.json') {
  let manifest = doc;
  if (typeof doc === 'string') {
    try {
      manifest = JSON.parse(doc);
    } catch (err) {
      throw new ManifestError(`${where}: not JSON: ${err.message}`);
    }
  }
  const result = new Validator(schema, '2020-12', false).validate(manifest);
  if (!result.valid) {
    // The innermost errors name the offending field; the outer ones only say "invalid".
    const leaves = result.errors.filter((e) => !['properties', 'items', '$ref', 'oneOf', 'allOf', 'anyOf'].includes(e.keyword));
    const shown = (leaves.length ? leaves : result.errors).slice(0, 5);
    const msg = shown.map((e) => `${e.instanceLocation} ${e.error}`).join('; ');
    throw new ManifestError(`${where}: invalid manifest: ${msg}`);
  }
  checkRules(manifest, where);
  return manifest;
}

function checkRules(m, where) {
  const fail = (msg) => {
    throw new ManifestError(`${where}: invalid manifest: ${msg}`);
  };
  for (const t of [m.input, m.labels, m.output, ...m.cuts]) {
    if (!t.shape.length || t.shape[0] !== null) fail(`${t.name}: the first dimension must be the free batch dimension (null)`);
    if (t.shape.slice(1).some((d) => d === null || d <= 0)) fail(`${t.name}: every dimension but the batch must be a positive integer`);
    if (t.shape.length !== LAYOUT_RANK[t.layout]) fail(`${t.name}: layout ${t.layout} needs rank ${LAYOUT_RANK[t.layout]}, shape is [${t.shape}]`);
  }
  const mode = SPLIT_MODES[m.split_mode];
  const names = m.slices.map((s) => s.name);
  if (names.join() !== mode.slices.join()) fail(`${m.split_mode} split needs slices ${mode.slices}, got ${names}`);
  if (m.cuts.length !== mode.cuts) fail(`${m.split_mode} split needs ${mode.cuts} cut tensor(s), got ${m.cuts.length}`);
  if (m.label_holder !== mode.label_holder) fail(`${m.split_mode} split keeps the labels on the ${mode.label_holder}`);
  for (const s of m.slices) if (s.side !== SLICE_SIDE[s.name]) fail(`slice ${s.name} runs on the ${SLICE_SIDE[s.name]}, not the ${s.side}`);
}

export function sliceOf(manifest, name) {
  const s = manifest.slices.find((x) => x.name === name);
  if (!s) throw new ManifestError(`the bundle has no slice ${name} (${manifest.split_mode} split)`);
  return s;
}

export function artifactOf(slice, format) {
  const a = slice.artifacts.find((x) => x.format === format);
  if (!a) throw new ManifestError(`slice ${slice.name} has no ${format} artefact (convert the bundle with TF.js export)`);
  return a;
}

/** Slices the device holds: A, and C in a double split. */
export function deviceSlices(manifest) {
  return manifest.split_mode === 'double' ? ['A', 'C'] : ['A'];
}

/** What B returns: the second cut (double split) or the logits (single). */
export function serverOutput(manifest) {
  return manifest.split_mode === 'double' ? manifest.cuts[1] : manifest.output;
}
