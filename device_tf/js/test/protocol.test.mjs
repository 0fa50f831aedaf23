/**
 * The JS modules hold the wire contract of shared_schema/protocol.json (its one source,
 * from which Python builds its constants), and decode + re-encode the golden frames of
 * tests/golden/frames byte for byte, as tests/test_protocol.py does for Python.
 */
import assert from 'node:assert/strict';
import { readFileSync, readdirSync } from 'node:fs';
import { test } from 'node:test';

import { ProtocolError, StepConflict } from '../src/errors.mjs';
import {
  DTYPES,
  FrameKind,
  HEADER_SIZE,
  LAYOUTS,
  MAGIC,
  MAX_NAME,
  MAX_NDIM,
  MEDIA_TYPE,
  NO_SESSION,
  VERSION,
  decode,
  encode,
  kindName,
  sessionHex,
} from '../src/frame.mjs';
import { LAYOUT_RANK, SLICE_SIDE, SPLIT_MODES } from '../src/manifest.mjs';

const root = new URL('../../../', import.meta.url);
const protocol = JSON.parse(readFileSync(new URL('shared_schema/protocol.json', root), 'utf8'));
const goldenDir = new URL('tests/golden/frames/', root);
const golden = JSON.parse(readFileSync(new URL('frames.json', goldenDir), 'utf8'));

const hex = (view) => Buffer.from(view.buffer, view.byteOffset, view.byteLength).toString('hex');

test('frame constants match protocol.json', () => {
  const spec = protocol.frame;
  assert.equal(new TextDecoder().decode(MAGIC), spec.magic);
  assert.equal(VERSION, spec.version);
  assert.equal(MEDIA_TYPE, spec.media_type);
  assert.equal(HEADER_SIZE, spec.header_size);
  assert.equal(MAX_NDIM, spec.max_ndim);
  assert.equal(MAX_NAME, spec.max_name);
  assert.equal(NO_SESSION.length, spec.session_bytes);
  assert.deepEqual({ ...FrameKind }, spec.kinds);
  assert.deepEqual({ ...DTYPES }, spec.dtypes);
  assert.deepEqual({ ...LAYOUTS }, spec.layouts);
});

test('manifest rules match protocol.json', () => {
  assert.deepEqual({ ...LAYOUT_RANK }, protocol.manifest.layout_rank);
  assert.deepEqual(JSON.parse(JSON.stringify(SPLIT_MODES)), protocol.manifest.split_modes);
  assert.deepEqual({ ...SLICE_SIDE }, protocol.manifest.slice_side);
});

test('error codes the device acts on are the server table', () => {
  const conflict = new StepConflict('x', { nextStep: 3 });
  assert.ok(conflict instanceof ProtocolError);
  assert.equal(protocol.errors[conflict.code], conflict.status);
  // transport.mjs waits (honouring Retry-After) on exactly these; each is in the table
  const transport = readFileSync(new URL('../src/transport.mjs', import.meta.url), 'utf8');
  for (const code of ['busy', 'shutting_down', 'rate_limited']) {
    assert.ok(transport.includes(`'${code}'`), code);
    assert.ok([429, 503].includes(protocol.errors[code]), code);
    assert.ok(protocol.retry_after_seconds[code] > 0, code);
  }
});

test('golden frames decode to frames.json and re-encode byte for byte', () => {
  const files = readdirSync(goldenDir).filter((f) => f.endsWith('.frames')).sort();
  assert.deepEqual(files.map((f) => f.replace(/\.frames$/, '')), Object.keys(golden).sort());
  for (const file of files) {
    const raw = new Uint8Array(readFileSync(new URL(file, goldenDir)));
    const frames = decode(raw);
    const want = golden[file.replace(/\.frames$/, '')];
    assert.equal(frames.length, want.length, file);
    frames.forEach((f, i) => {
      const w = want[i];
      assert.equal(kindName(f.kind), w.kind, file);
      assert.equal(f.name, w.name, file);
      assert.equal(f.dtype, w.dtype, file);
      assert.deepEqual(f.shape, w.shape, file);
      assert.equal(f.layout, w.layout, file);
      assert.equal(sessionHex(f.session), w.session, file);
      assert.equal(f.step, w.step, file);
      assert.equal(hex(f.data), w.payload_hex, `${file} frame ${i}`);
    });
    assert.equal(hex(encode(frames)), hex(raw), file);
  }
});
