/**
 * The JS device follows shared_schema/layers.json, the one table of which Keras layer
 * classes spliteasy carries where (converters/cuts.py, export/tfjs.py, export/tflite.py
 * read it through shared_schema/layers.py): TF.js registers every carried class, treats
 * exactly the table's "unrepeatable" noise layers as unrepeatable, and reseeds exactly
 * its "reseeded" ones (those TF.js has).
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';

import * as tf from '@tensorflow/tfjs';

import { reseed, unrepeatableLayers } from '../src/layers.mjs';

await tf.setBackend('cpu');
const table = JSON.parse(readFileSync(new URL('../../../shared_schema/layers.json', import.meta.url), 'utf8'));
const registered = new Set(Object.keys(tf.serialization.SerializationMap.getMap().classNameMap));

test('TF.js registers every class the table lets it hold, and its tfjs_classes list', () => {
  const carried = Object.entries(table.layers).filter(([, why]) => !why.tfjs).map(([c]) => c);
  const missing = [...carried, ...table.tfjs_classes.classes].filter((c) => !registered.has(c));
  assert.deepEqual(missing, []);
  // and a class the table refuses to TF.js is one TF.js really lacks
  const refused = Object.entries(table.layers).filter(([, why]) => why.tfjs).map(([c]) => c);
  assert.deepEqual(refused.filter((c) => registered.has(c)), []);
});

test('unrepeatable noise layers are the table\'s', () => {
  const model = tf.sequential({
    layers: [
      tf.layers.dense({ units: 4, inputShape: [4] }),
      tf.layers.gaussianNoise({ stddev: 0.1 }),
      tf.layers.gaussianDropout({ rate: 0.1 }),
      tf.layers.alphaDropout({ rate: 0.1 }),
      tf.layers.dropout({ rate: 0.1 }),
    ],
  });
  const found = unrepeatableLayers(model).map((s) => s.match(/\((\w+)\)$/)[1]);
  assert.deepEqual(found.sort(), [...table.random.unrepeatable].sort());
});

test('reseeded layers are the table\'s (the ones TF.js has)', () => {
  const model = tf.sequential({
    layers: [
      tf.layers.dense({ units: 4, inputShape: [3, 4] }),
      tf.layers.dropout({ rate: 0.1 }),
      tf.layers.spatialDropout1d({ rate: 0.1 }),
      tf.layers.gaussianDropout({ rate: 0.1 }),
    ],
  });
  reseed(model, 5);
  const seeded = model.layers.filter((l) => l.seed !== undefined && l.seed !== null).map((l) => l.getClassName());
  const expected = table.random.reseeded.filter((c) => registered.has(c));
  assert.deepEqual(seeded.sort(), expected.sort());
});
