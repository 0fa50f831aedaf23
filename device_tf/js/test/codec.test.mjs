/**
 * The JS wire codecs (src/codec.mjs through src/frame.mjs): the constants of protocol.json,
 * the golden compressed frames Python wrote (tests/golden/frames/codec/, byte for byte both
 * ways: our encoding of the same inputs is the file, our decoding of the file is Python's
 * values), each codec's round-trip error bound, and the negotiated-codec checks of decode.
 * tests/test_codec.py holds the Python twins.
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';

import { CHANNEL_AXIS, CODECS, COMPRESSIBLE_KINDS, DEFAULT_CODEC, channels } from '../src/codec.mjs';
import { FrameSizeMismatch, FrameSpecMismatch, UnsupportedVersion } from '../src/errors.mjs';
import { FrameKind, decode, encode, frame, kindName, sessionBytes, sessionHex } from '../src/frame.mjs';

const root = new URL('../../../', import.meta.url);
const protocol = JSON.parse(readFileSync(new URL('shared_schema/protocol.json', root), 'utf8'));
const goldenDir = new URL('tests/golden/frames/codec/', root);
const golden = JSON.parse(readFileSync(new URL('codec.json', goldenDir), 'utf8'));

const hex = (view) => Buffer.from(view.buffer, view.byteOffset, view.byteLength).toString('hex');
const fromHex = (h, Ctor) => {
  const b = Buffer.from(h, 'hex');
  return new Ctor(b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength));
};

test('codec constants match protocol.json', () => {
  const spec = protocol.codecs;
  assert.equal(DEFAULT_CODEC, spec.default);
  assert.deepEqual([...COMPRESSIBLE_KINDS], spec.compressible_kinds);
  assert.deepEqual({ ...CHANNEL_AXIS }, spec.channel_axis);
  assert.deepEqual(JSON.parse(JSON.stringify(CODECS)), spec.schemes);
  assert.equal(protocol.errors.unsupported_codec, 422);
});

test('golden compressed frames: same bytes from the same inputs, same values decoded', () => {
  assert.deepEqual(Object.keys(golden).sort(), Object.keys(CODECS).sort());
  for (const [codec, rows] of Object.entries(golden)) {
    const raw = new Uint8Array(readFileSync(new URL(`${codec}.frames`, goldenDir)));
    const inputs = rows.map((r) =>
      frame(FrameKind[r.kind], r.name, fromHex(r.input_hex, r.dtype === 'int32' ? Int32Array : Float32Array), r.shape, r.layout, {
        session: sessionBytes(r.session),
        step: r.step,
        codec: r.codec,
      }),
    );
    assert.equal(hex(encode(inputs)), hex(raw), `${codec}: encoded bytes`);
    const frames = decode(raw);
    assert.equal(frames.length, rows.length);
    frames.forEach((f, i) => {
      const r = rows[i];
      assert.equal(kindName(f.kind), r.kind);
      assert.equal(f.name, r.name);
      assert.equal(f.dtype, r.dtype);
      assert.deepEqual(f.shape, r.shape);
      assert.equal(f.layout, r.layout);
      assert.equal(sessionHex(f.session), r.session);
      assert.equal(f.step, r.step);
      assert.equal(f.codec, r.codec, `${codec} frame ${i}`);
      assert.equal(hex(f.data), r.decoded_hex, `${codec} frame ${i} (${r.name}): decoded values`);
    });
  }
});

function rng(seed) {
  let s = seed >>> 0;
  return () => {
    s = (s * 1664525 + 1013904223) >>> 0;
    return s / 2 ** 32;
  };
}

test('round trip within each codec bound (random NHWC, NCHW, NC tensors)', () => {
  const r = rng(7);
  for (const [shape, layout] of [
    [[4, 5, 5, 6], 'NHWC'],
    [[3, 6, 4, 4], 'NCHW'],
    [[7, 33], 'NC'],
  ]) {
    const n = shape.reduce((a, b) => a * b, 1);
    const x = Float32Array.from({ length: n }, () => (r() - 0.5) * 10 * (r() < 0.1 ? 100 : 1));
    for (const codec of Object.keys(CODECS)) {
      const [f] = decode(encode([frame(FrameKind.GRADIENT, 'g', x, shape, layout, { codec })]));
      assert.equal(f.codec, codec);
      const c = CODECS[codec];
      const [axis, ch] = channels(codec, shape, layout);
      const inner = axis === null ? n : shape.slice(axis + 1).reduce((a, b) => a * b, 1);
      const lo = new Float64Array(ch).fill(Infinity);
      const hi = new Float64Array(ch).fill(-Infinity);
      const chan = (i) => (axis === null ? 0 : Math.floor(i / inner) % ch);
      x.forEach((v, i) => {
        lo[chan(i)] = Math.min(lo[chan(i)], v);
        hi[chan(i)] = Math.max(hi[chan(i)], v);
      });
      x.forEach((v, i) => {
        const err = Math.abs(f.data[i] - v);
        let bound;
        if (codec === 'float32') bound = 0;
        else if (codec === 'fp16') bound = Math.abs(v) * 2 ** -11 + 2 ** -25;
        else if (codec === 'bf16') bound = Math.abs(v) * 2 ** -8;
        else {
          const half = c.rounding === 'stochastic' ? 1 : 0.5; // stochastic: within one step
          bound = ((hi[chan(i)] - lo[chan(i)]) / c.levels) * half * (1 + 1e-6) + Math.abs(v) * 2 ** -23;
        }
        assert.ok(err <= bound, `${codec} ${layout}: |${f.data[i]} - ${v}| = ${err} > ${bound}`);
      });
    }
  }
});

test('compressed frames are smaller by their bit width', () => {
  const x = new Float32Array(32 * 8 * 8 * 16).fill(0.25);
  const size = (codec) => encode([frame(FrameKind.ACTIVATION, 'a', x, [32, 8, 8, 16], 'NHWC', { codec })]).length;
  const raw = size('float32');
  assert.ok(size('fp16') / raw <= 0.51);
  assert.ok(size('bf16') / raw <= 0.51);
  assert.ok(size('int8') / raw <= 0.26);
  assert.ok(size('int8-channel') / raw <= 0.26);
  assert.ok(raw / size('int4') >= 7.5);
});

test('a session codec is enforced on decode; raw kinds stay raw', () => {
  const x = Float32Array.from({ length: 12 }, (_, i) => i / 3);
  const fp16 = encode([frame(FrameKind.ACTIVATION, 'a', x, [3, 4], 'NC', { codec: 'fp16' })]);
  const plain = encode([frame(FrameKind.ACTIVATION, 'a', x, [3, 4], 'NC')]);
  assert.equal(decode(fp16, { codec: 'fp16' })[0].codec, 'fp16');
  assert.throws(() => decode(fp16, { codec: 'float32' }), UnsupportedVersion);
  assert.throws(() => decode(plain, { codec: 'int8' }), UnsupportedVersion);
  assert.throws(() => decode(fp16, { codec: 'fp16', maxElements: 11 }), FrameSizeMismatch);
  // labels never travel compressed
  assert.throws(
    () => encode([frame(FrameKind.LABELS, 'y', new Int32Array([1]), [1], 'N', { codec: 'int8' })]),
    FrameSpecMismatch,
  );
  const lab = encode([frame(FrameKind.LABELS, 'y', new Int32Array([1]), [1], 'N')]);
  lab[9] = 1;
  assert.throws(() => decode(lab), UnsupportedVersion);
  // a payload that is not the codec's size, an unknown flag, an unknown codec name
  const short = fp16.slice(0, fp16.length - 2);
  new DataView(short.buffer).setBigUint64(36, 22n, true);
  assert.throws(() => decode(short), FrameSizeMismatch);
  const unknown = fp16.slice();
  unknown[9] = 0x7f;
  assert.throws(() => decode(unknown), UnsupportedVersion);
  assert.throws(() => encode([frame(FrameKind.ACTIVATION, 'a', x, [3, 4], 'NC', { codec: 'top-k' })]), FrameSpecMismatch);
  // a quantised codec refuses NaN rather than sending garbage scales
  const bad = x.slice();
  bad[5] = NaN;
  assert.throws(() => encode([frame(FrameKind.ACTIVATION, 'a', bad, [3, 4], 'NC', { codec: 'int4' })]), FrameSpecMismatch);
});
