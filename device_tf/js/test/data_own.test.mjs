/**
 * Own data in the JS device: float label rows (one-hot, binary / multi-label, regression)
 * through parseData, batches, schedule and shuffled; the page's folder picker's labelling
 * (page_data.mjs classify / labelsFor: pure, so Node checks it; the decoding itself runs in
 * Chromium, tests/test_data_browser.py).
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { batches, parseData, schedule } from '../src/data.mjs';
import { DeviceError } from '../src/errors.mjs';
import { FrameKind, encode, frame } from '../src/frame.mjs';
import { classify, labelsFor } from '../src/page_data.mjs';
import { shuffled } from '../src/shuffle.mjs';

const input = { name: 'image', shape: [null, 2, 2, 1], layout: 'NHWC', dtype: 'float32' };
const rows = (n, k) =>
  encode([
    frame(FrameKind.ACTIVATION, 'image', Float32Array.from({ length: n * 4 }, (_, i) => i), [n, 2, 2, 1], 'NHWC'),
    frame(FrameKind.LABELS, 'labels', Float32Array.from({ length: n * k }, (_, i) => i), [n, k], 'NC'),
  ]);
const manifest = (name, k = 3) => ({
  loss: { name, from_logits: true },
  num_classes: k,
  labels:
    name === 'sparse_categorical_crossentropy'
      ? { name: 'labels', shape: [null], dtype: 'int32', layout: 'N' }
      : { name: 'labels', shape: [null, k], dtype: 'float32', layout: 'NC' },
});

test('float label rows travel with their samples', () => {
  const data = parseData(rows(5, 3), input, manifest('categorical_crossentropy'));
  assert.deepEqual(data.labelShape, [3]);
  const got = [...batches(data, { batchSize: 2 })];
  assert.deepEqual(Array.from(got[1].y), [6, 7, 8, 9, 10, 11]);
  assert.deepEqual(Array.from(schedule(data, { batchSize: 2 }).at(2).y), [12, 13, 14]);
  const s = shuffled(data, 1, 0);
  for (let i = 0; i < 5; i++) {
    const src = s.x[i * 4] / 4; // x row i came from sample src: its label row must too
    assert.deepEqual(Array.from(s.y.subarray(i * 3, i * 3 + 3)), [src * 3, src * 3 + 1, src * 3 + 2]);
  }
});

test('labels that do not fit the loss are refused, naming both', () => {
  assert.throws(() => parseData(rows(5, 3), input, manifest('sparse_categorical_crossentropy')), DeviceError);
  assert.throws(() => parseData(rows(5, 2), input, manifest('mean_squared_error')), /float32 \[5,2\].*takes float32 \[N, 3\]/);
});

const file = (path) => ({ name: path.split('/').at(-1), webkitRelativePath: path });

test('a picked folder: classes from the first subfolder, sorted, files in path order', () => {
  const picked = ['photos/top/b.png', 'photos/left/x.JPG', 'photos/top/a.gif', 'photos/notes.txt', 'photos/top.png', 'photos/left/.hidden.png', 'photos/bottom/sub/z.bmp'].map(file);
  const { classes, items, source } = classify(picked);
  assert.equal(source, 'photos');
  assert.deepEqual(classes, ['bottom', 'left', 'top']);
  assert.deepEqual(items.map((it) => [it.path, it.index]), [
    ['photos/bottom/sub/z.bmp', 0],
    ['photos/left/x.JPG', 1],
    ['photos/top/a.gif', 2],
    ['photos/top/b.png', 2],
  ]);
  assert.throws(() => classify([file('photos/a.txt')]), /photos: empty: no images/);
  assert.deepEqual(classify([{ name: 'cat_1.png', webkitRelativePath: '' }, { name: 'dog_1.png', webkitRelativePath: '' }]).classes, ['cat', 'dog']);
  assert.throws(() => classify([{ name: 'cat.png', webkitRelativePath: '' }]), /cannot tell its class/);
});

test('labels per loss, as the Python device makes them', () => {
  assert.deepEqual(labelsFor(manifest('sparse_categorical_crossentropy'), [0, 2], ['a', 'b', 'c']), { data: Int32Array.from([0, 2]), shape: [2], layout: 'N' });
  assert.deepEqual(Array.from(labelsFor(manifest('categorical_crossentropy'), [0, 2], ['a', 'b', 'c']).data), [1, 0, 0, 0, 0, 1]);
  assert.deepEqual(labelsFor(manifest('binary_crossentropy', 1), [0, 1], ['a', 'b']).shape, [2, 1]);
  assert.throws(() => labelsFor(manifest('sparse_categorical_crossentropy', 2), [0, 2], ['a', 'b', 'c']), /3 classes \(a, b, c\), more than the model's 2 outputs/);
  assert.throws(() => labelsFor(manifest('mean_absolute_error'), [0], ['a']), /regression/);
});
