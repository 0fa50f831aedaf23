import assert from 'node:assert/strict';
import { test } from 'node:test';

import { batches, countSteps, parseData } from '../src/data.mjs';
import { DeviceError } from '../src/errors.mjs';
import { FrameKind, encode, frame } from '../src/frame.mjs';
import { shuffled } from '../src/shuffle.mjs';

const N = 10;
const file = (n = N, labels = n) =>
  encode([
    frame(FrameKind.ACTIVATION, 'image', Float32Array.from({ length: n * 4 }, (_, i) => i), [n, 2, 2, 1], 'NHWC'),
    frame(FrameKind.LABELS, 'labels', Int32Array.from({ length: labels }, (_, i) => i), [labels], 'N'),
  ]);
const input = { name: 'image', shape: [null, 2, 2, 1], layout: 'NHWC', dtype: 'float32' };

test('batches follow file order, the last one short', () => {
  const data = parseData(file(), input);
  const got = [...batches(data, { batchSize: 4, epochs: 2 })];
  assert.deepEqual(got.map((b) => b.shape[0]), [4, 4, 2, 4, 4, 2]);
  assert.deepEqual(Array.from(got[1].y), [4, 5, 6, 7]);
  assert.deepEqual(Array.from(got[1].x.subarray(0, 4)), [16, 17, 18, 19]);
  assert.deepEqual(got.map((b) => b.epoch), [0, 0, 0, 1, 1, 1]);
  assert.equal(countSteps(data, { batchSize: 4, epochs: 2 }), 6);
  assert.equal([...batches(data, { batchSize: 4, epochs: 2, steps: 4 })].length, 4);
});

test('shuffling permutes x and y together, reproducibly', () => {
  const data = parseData(file(), input);
  const a = shuffled(data, 3, 0);
  const b = shuffled(data, 3, 0);
  assert.deepEqual(Array.from(a.y), Array.from(b.y));
  assert.notDeepEqual(Array.from(a.y), Array.from(data.y));
  assert.deepEqual([...a.y].sort((p, q) => p - q), Array.from(data.y));
  for (let i = 0; i < N; i++) assert.equal(a.x[i * 4], a.y[i] * 4);
  assert.notDeepEqual(Array.from(shuffled(data, 3, 1).y), Array.from(a.y));
});

test('bad data files are refused with the reason', () => {
  assert.throws(() => parseData(file(5, 4)), /5 samples but 4 labels/);
  assert.throws(() => parseData(file(), { ...input, shape: [null, 8, 8, 1] }), DeviceError);
  const one = encode([frame(FrameKind.LABELS, 'labels', new Int32Array(2), [2], 'N')]);
  assert.throws(() => parseData(one), /exactly two frames/);
});
