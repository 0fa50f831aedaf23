// Train steps of slice A and/or C alone, with inputs given: tests/test_js_runtime.py
// compares the results with tf_keras on the same slices (InceptionV3's included).
// Usage: node tools/slice_step.mjs CONFIG.json, CONFIG = {a?, c?: tfjs dirs, inputs: frames
// file, steps, optimizer, numClasses, fromLogits, out: frames file}. The inputs file holds
// x, g_a (for A) and b, y (for C); each step reuses them. The output file holds, per step
// s, "a.s" (A's output), "loss.s" and "g_b.s", then every variable flattened as "A:layer/var".
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';

import * as tf from '@tensorflow/tfjs';

import { initBackend } from '../src/backend.mjs';
import { FrameKind, decode, encode, frame, scalar } from '../src/frame.mjs';
import { TfjsSlices, loadLayersModel } from '../src/slices.mjs';

await initBackend();
const cfg = JSON.parse(await readFile(process.argv[2], 'utf8'));
const load = async (dir) => {
  const modelJson = JSON.parse(await readFile(join(dir, 'model.json'), 'utf8'));
  return loadLayersModel(modelJson, (p) => readFile(join(dir, p)));
};
const inputs = Object.fromEntries(decode(new Uint8Array(await readFile(cfg.inputs))).map((f) => [f.name, f]));
const t = (name) => tf.tensor(inputs[name].data, inputs[name].shape, inputs[name].dtype);
const manifest = {
  split_mode: 'double',
  optimizer: cfg.optimizer,
  num_classes: cfg.numClasses,
  loss: { from_logits: cfg.fromLogits ?? true },
};
// TfjsSlices wants both slices; a slice not under test is a stand-in that is never called.
const a = cfg.a ? await load(cfg.a) : tf.sequential({ layers: [tf.layers.dense({ units: 1, inputShape: [1] })] });
const c = cfg.c ? await load(cfg.c) : a;
const rt = new TfjsSlices(manifest, { A: a, C: c });
const out = [];
for (let s = 0; s < cfg.steps; s++) {
  if (cfg.a) {
    const x = t('x');
    const g = t('g_a');
    const y = rt.aForward(x);
    out.push(frame(FrameKind.ACTIVATION, `a.${s}`, y.dataSync(), y.shape, 'N', { dtype: 'float32' }));
    rt.aBackward(g);
    tf.dispose([x, g, y]);
  }
  if (cfg.c) {
    const b = t('b');
    const y = t('y');
    const { loss, gB } = rt.cTrain(b, y);
    out.push(scalar(`loss.${s}`, loss));
    out.push(frame(FrameKind.GRADIENT, `g_b.${s}`, gB.dataSync(), gB.shape, 'N', { dtype: 'float32' }));
    tf.dispose([b, y, gB]);
  }
}
for (const [slice, ws] of Object.entries(rt.weights())) {
  if ((slice === 'A' && !cfg.a) || (slice === 'C' && !cfg.c)) continue;
  for (const [name, w] of Object.entries(ws)) {
    out.push(frame(FrameKind.ACTIVATION, `${slice}:${name}`, w.data, [w.data.length], 'N'));
  }
}
await writeFile(cfg.out, encode(out));
