// Trains A -> C with the server's slice B replaced by the identity, in-process: the
// pytest suite compares its losses and weights with tf_keras training the unsplit A∘C.
// Usage: node test/local_train.mjs CONFIG.json  (see tests/test_js_runtime.py)
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';

import * as tf from '@tensorflow/tfjs';

import { batches, parseData } from '../src/data.mjs';
import { initBackend } from '../src/backend.mjs';
import { TfjsSlices, loadLayersModel } from '../src/slices.mjs';

await initBackend();
const cfg = JSON.parse(await readFile(process.argv[2], 'utf8'));
const load = async (dir) => {
  const modelJson = JSON.parse(await readFile(join(dir, 'model.json'), 'utf8'));
  return loadLayersModel(modelJson, (p) => readFile(join(dir, p)));
};
const manifest = {
  split_mode: 'double',
  optimizer: cfg.optimizer,
  num_classes: cfg.numClasses,
  loss: { from_logits: cfg.fromLogits ?? true },
};
const rt = new TfjsSlices(manifest, { A: await load(cfg.a), C: await load(cfg.c) });
const data = parseData(new Uint8Array(await readFile(cfg.data)));
const losses = [];
for (const batch of batches(data, { batchSize: cfg.batchSize, steps: cfg.steps, epochs: cfg.epochs ?? 1 })) {
  const x = tf.tensor(batch.x, batch.shape);
  const y = tf.tensor1d(batch.y, 'int32');
  const a = rt.aForward(x);
  const { loss, gB } = rt.cTrain(a, y);
  rt.aBackward(gB);
  losses.push(loss);
  tf.dispose([x, y, a, gB]);
}
const weights = {};
for (const [slice, ws] of Object.entries(rt.weights())) {
  for (const [k, v] of Object.entries(ws)) weights[`${slice}:${k}`] = Array.from(v);
}
await writeFile(cfg.out, JSON.stringify({ losses, weights, tensors: tf.memory().numTensors }));
