import assert from 'node:assert/strict';
import { test } from 'node:test';

import {
  BadMagic,
  FrameSizeMismatch,
  FrameSpecMismatch,
  TruncatedFrame,
  UnsupportedVersion,
} from '../src/errors.mjs';
import { FrameKind, HEADER_SIZE, check, decode, encode, frame, scalar, sessionBytes } from '../src/frame.mjs';

const session = sessionBytes('00112233445566778899aabbccddeeff');
const act = () =>
  frame(FrameKind.ACTIVATION, 'a_out', Float32Array.from({ length: 2 * 3 * 3 * 2 }, (_, i) => i / 7), [2, 3, 3, 2], 'NHWC', {
    session,
    step: 41,
  });

test('round trip keeps every field', () => {
  const msg = encode([act(), scalar('loss', 1.5, { session, step: 41 })]);
  const [f, s] = decode(msg);
  assert.equal(f.kind, FrameKind.ACTIVATION);
  assert.equal(f.name, 'a_out');
  assert.deepEqual(f.shape, [2, 3, 3, 2]);
  assert.equal(f.layout, 'NHWC');
  assert.equal(f.step, 41);
  assert.deepEqual(Array.from(f.session), Array.from(session));
  assert.deepEqual(Array.from(f.data), Array.from(act().data));
  assert.equal(s.kind, FrameKind.SCALAR);
  assert.deepEqual(s.shape, []);
  assert.equal(s.data[0], 1.5);
});

test('decoding copies odd-offset payloads into aligned arrays', () => {
  const f = frame(FrameKind.GRADIENT, 'abc', new Float32Array([1, 2, 3]), [1, 3], 'NC');
  const [g] = decode(encode([f]));
  assert.ok(g.data instanceof Float32Array);
  assert.deepEqual(Array.from(g.data), [1, 2, 3]);
});

test('every corruption is a named FrameError', () => {
  const msg = encode([act()]);
  assert.throws(() => decode(new Uint8Array(0)), TruncatedFrame);
  assert.throws(() => decode(msg.subarray(0, 10)), TruncatedFrame);
  assert.throws(() => decode(msg.subarray(0, msg.length - 1)), TruncatedFrame);
  assert.throws(() => decode(new TextEncoder().encode('{"json": true}')), BadMagic);
  assert.throws(() => decode(new Uint8Array([1, 2])), BadMagic);
  const v2 = msg.slice();
  v2[4] = 2;
  assert.throws(() => decode(v2), UnsupportedVersion);
  const badKind = msg.slice();
  badKind[5] = 99;
  assert.throws(() => decode(badKind), FrameSpecMismatch);
  const badSize = msg.slice();
  new DataView(badSize.buffer).setBigUint64(36, 12n, true);
  assert.throws(() => decode(badSize), FrameSizeMismatch);
  const badName = msg.slice();
  badName[HEADER_SIZE] = 0xff;
  assert.throws(() => decode(badName), FrameSpecMismatch);
  const trailing = new Uint8Array(msg.length + 3);
  trailing.set(msg);
  trailing.set([0x53, 0x50, 0x4c], msg.length);
  assert.throws(() => decode(trailing), TruncatedFrame);
});

test('encode refuses what the wire cannot carry', () => {
  assert.throws(() => encode([frame(FrameKind.ACTIVATION, 'x', new Float64Array(2), [2], 'N')]), FrameSpecMismatch);
  assert.throws(() => encode([frame(FrameKind.ACTIVATION, 'x', new Float32Array(3), [2], 'N')]), FrameSizeMismatch);
  assert.throws(() => encode([frame(FrameKind.ACTIVATION, 'x'.repeat(201), new Float32Array(1), [1], 'N')]), FrameSpecMismatch);
  assert.throws(
    () => encode([frame(FrameKind.ACTIVATION, 'x', new Float32Array(1), [1], 'N', { session: new Uint8Array(3) })]),
    FrameSpecMismatch,
  );
});

test('check compares with the manifest tensor', () => {
  const spec = { name: 'a_out', shape: [null, 3, 3, 2], dtype: 'float32', layout: 'NHWC' };
  check(act(), spec, FrameKind.ACTIVATION);
  assert.throws(() => check(act(), spec, FrameKind.GRADIENT), /expected a GRADIENT frame/);
  assert.throws(() => check(act(), { ...spec, name: 'b' }), /expected tensor 'b'/);
  assert.throws(() => check(act(), { ...spec, shape: [null, 3, 3, 4] }), /manifest says \[N, 3, 3, 4\]/);
  assert.throws(() => check(act(), { ...spec, layout: 'NCHW' }), /layout NHWC/);
  assert.throws(() => check(act(), { ...spec, dtype: 'float16' }), /dtype float32/);
});
