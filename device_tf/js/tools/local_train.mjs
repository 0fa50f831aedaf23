// Trains A -> C with the server's slice B replaced by the identity, in-process: the
// pytest suite (tests/test_js_runtime.py) compares what it writes with tf_keras training
// the unsplit A∘C. Usage: node tools/local_train.mjs CONFIG.json, where CONFIG holds
// {a, c: tfjs dirs, data, batchSize, steps, optimizer, numClasses, fromLogits, out, infer?}.
// Writes {initial, weights: {"A:layer/var": [...]}, losses, inference, tensors}.
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';

import * as tf from '@tensorflow/tfjs';

import { initBackend } from '../src/backend.mjs';
import { batches, parseData } from '../src/data.mjs';
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
const flat = () => {
  const out = {};
  for (const [slice, ws] of Object.entries(rt.weights())) {
    for (const [k, w] of Object.entries(ws)) out[`${slice}:${k}`] = Array.from(w.data);
  }
  return out;
};
const initial = flat();
const data = parseData(new Uint8Array(await readFile(cfg.data)));
const losses = [];
for (const batch of batches(data, { batchSize: cfg.batchSize, steps: cfg.steps })) {
  const x = tf.tensor(batch.x, batch.shape);
  const y = tf.tensor1d(batch.y, 'int32');
  const a = rt.aForward(x);
  const { loss, gB } = rt.cTrain(a, y);
  rt.aBackward(gB);
  losses.push(loss);
  tf.dispose([x, y, a, gB]);
}
let inference = null;
if (cfg.infer) {
  const d = parseData(new Uint8Array(await readFile(cfg.infer)));
  inference = tf.tidy(() => Array.from(rt.cInfer(rt.aInfer(tf.tensor(d.x, [d.count, ...d.sampleShape]))).dataSync()));
}
const tensors = tf.memory().numTensors;
await writeFile(cfg.out, JSON.stringify({ initial, weights: flat(), losses, inference, tensors }));
