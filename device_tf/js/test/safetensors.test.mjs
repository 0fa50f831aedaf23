import assert from 'node:assert/strict';
import { test } from 'node:test';

import { DeviceError } from '../src/errors.mjs';
import { decodeSafetensors, encodeSafetensors } from '../src/safetensors.mjs';

const sample = () =>
  new Map([
    ['A/a_conv1/kernel', { shape: [3, 3, 1, 4], data: Float32Array.from({ length: 36 }, (_, i) => i / 7 - 2) }],
    ['A/a_bn/moving_mean', { shape: [4], data: Float32Array.from([0.5, -1e-30, 3.4e38, Number.NaN]) }],
    ['A/iterations', { shape: [], data: BigInt64Array.from([2n ** 40n + 3n]) }],
    ['C/labels', { shape: [2, 3], data: Int32Array.from([1, -2, 3, 2147483647, -2147483648, 0]) }],
    ['C/empty', { shape: [0, 5], data: new Float32Array(0) }],
    ['C/f64', { shape: [1], data: Float64Array.from([Math.PI]) }],
    ['C/u8', { shape: [3], data: Uint8Array.from([1, 2, 255]) }],
  ]);

test('round trip keeps names, order of insertion, dtypes, shapes and bit patterns', () => {
  const bytes = encodeSafetensors(sample(), { format: 'spliteasy-device', step: '12' });
  const { tensors, metadata } = decodeSafetensors(bytes);
  assert.deepEqual(metadata, { format: 'spliteasy-device', step: '12' });
  assert.deepEqual([...tensors.keys()], [...sample().keys()]);
  for (const [name, want] of sample()) {
    const got = tensors.get(name);
    assert.deepEqual(got.shape, want.shape, name);
    assert.equal(got.data.constructor, want.data.constructor, name);
    const raw = (a) => Array.from(new Uint8Array(a.buffer, a.byteOffset, a.byteLength));
    assert.deepEqual(raw(got.data), raw(want.data), name); // NaN and -1e-30 bit for bit
  }
  assert.equal(tensors.get('A/iterations').dtype, 'I64');
  assert.equal(tensors.get('A/iterations').data[0], 2n ** 40n + 3n);
});

test('layout: u64 LE header length, space-padded JSON to 8 bytes, contiguous offsets', () => {
  const bytes = encodeSafetensors({ w: { shape: [2], data: Float32Array.from([1, 2]) } });
  const n = Number(new DataView(bytes.buffer).getBigUint64(0, true));
  assert.equal(n % 8, 0);
  const text = new TextDecoder().decode(bytes.subarray(8, 8 + n));
  assert.match(text, /^\{.*\} *$/);
  assert.deepEqual(JSON.parse(text), { w: { dtype: 'F32', shape: [2], data_offsets: [0, 8] } });
  assert.equal(bytes.length, 8 + n + 8);
  assert.deepEqual(Array.from(new Float32Array(bytes.slice(8 + n).buffer)), [1, 2]);
});

test('views into a larger buffer are written as their own bytes only', () => {
  const big = Float32Array.from([9, 1, 2, 3, 9]);
  const bytes = encodeSafetensors({ v: { shape: [3], data: big.subarray(1, 4) } });
  assert.deepEqual(Array.from(decodeSafetensors(bytes).tensors.get('v').data), [1, 2, 3]);
});

test('the writer refuses inconsistent tensors', () => {
  assert.throws(() => encodeSafetensors({ w: { shape: [3], data: new Float32Array(2) } }), DeviceError);
  assert.throws(() => encodeSafetensors({ w: { shape: [2], data: new Float32Array(2), dtype: 'I32' } }), DeviceError);
  assert.throws(() => encodeSafetensors({ w: { shape: [1], data: [1] } }), DeviceError);
  assert.throws(() => encodeSafetensors({ __metadata__: { shape: [1], data: new Float32Array(1) } }), DeviceError);
});

test('the reader names torn and malformed files', () => {
  const good = encodeSafetensors(sample());
  const bad = (bytes, pattern) => assert.throws(() => decodeSafetensors(bytes, 'x.safetensors'), pattern);
  bad(good.subarray(0, 5), /shorter than the 8-byte header length/);
  bad(good.subarray(0, 40), /header of \d+ bytes in a file of 40/);
  bad(good.subarray(0, good.length - 1), /tensors cover \d+ of \d+ data bytes/);
  const extra = new Uint8Array(good.length + 4);
  extra.set(good);
  bad(extra, /tensors cover/);
  const garbled = good.slice();
  garbled[8] = 0x5b; // '[' : not an object / not JSON
  bad(garbled, /x\.safetensors: header/);
  const mk = (header, dataBytes) => {
    const json = new TextEncoder().encode(JSON.stringify(header));
    const out = new Uint8Array(8 + json.length + dataBytes);
    new DataView(out.buffer).setBigUint64(0, BigInt(json.length), true);
    out.set(json, 8);
    return out;
  };
  bad(mk({ w: { dtype: 'Q7', shape: [1], data_offsets: [0, 4] } }, 4), /unsupported dtype Q7/);
  bad(mk({ w: { dtype: 'F32', shape: [2], data_offsets: [0, 4] } }, 4), /4 bytes for shape \[2\]/);
  bad(
    mk({ a: { dtype: 'F32', shape: [1], data_offsets: [4, 8] }, b: { dtype: 'F32', shape: [1], data_offsets: [4, 8] } }, 8),
    /does not follow/,
  );
});
