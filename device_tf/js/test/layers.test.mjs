import assert from 'node:assert/strict';
import { test } from 'node:test';

import * as tf from '@tensorflow/tfjs';

import { initBackend } from '../src/backend.mjs';
import { reseed } from '../src/layers.mjs';

await initBackend();

const roundTrip = async (model) => {
  // Through serialisation, as a converted slice is loaded: BN becomes the Keras-exact class.
  let saved;
  await model.save(tf.io.withSaveHandler(async (art) => ((saved = art), { modelArtifactsInfo: {} })));
  return tf.loadLayersModel(tf.io.fromMemory(saved));
};

test('BatchNormalization without scale or center trains (tfjs #2868)', async () => {
  const input = tf.input({ shape: [4, 4, 3] });
  const bn = tf.layers.batchNormalization({ scale: false, center: false, momentum: 0.5 }).apply(input);
  const model = await roundTrip(tf.model({ inputs: input, outputs: bn }));
  const x = tf.randomNormal([5, 4, 4, 3], 2, 3, 'float32', 1);
  const dx = tf.grad((t) => tf.sum(tf.square(model.apply(t, { training: true }))))(x);
  assert.ok(dx.dataSync().every(Number.isFinite));
  // The moving variance takes the unbiased batch variance (Keras' fused kernel), once.
  const [movingMean, movingVar] = model.getWeights();
  const { mean, variance } = tf.moments(x, [0, 1, 2]);
  const n = 5 * 4 * 4;
  const expectMean = tf.mul(mean, 0.5);
  const expectVar = tf.add(0.5, tf.mul(variance, 0.5 * (n / (n - 1))));
  assert.ok(tf.max(tf.abs(tf.sub(movingMean, expectMean))).dataSync()[0] < 1e-5);
  assert.ok(tf.max(tf.abs(tf.sub(movingVar, expectVar))).dataSync()[0] < 1e-5);
  // The gradient is the gradient of the formula, entry by entry: autograd of
  // (x - mean) / sqrt(var + 0.001) written with plain ops, independent of the layer.
  // (The loss weighs the outputs unevenly: sum(y^2) of a normalised y is nearly constant,
  // and its gradient nearly zero.)
  const w = tf.randomNormal([5, 4, 4, 3], 0, 1, 'float32', 2);
  const dxLayer = tf.grad((t) => tf.sum(tf.mul(model.apply(t, { training: true }), w)))(x);
  const formula = (t) => {
    const m = tf.moments(t, [0, 1, 2]);
    return tf.sum(tf.mul(tf.div(tf.sub(t, m.mean), tf.sqrt(tf.add(m.variance, 0.001))), w));
  };
  const dxRef = tf.grad(formula)(x);
  const scale = tf.max(tf.abs(dxRef)).dataSync()[0];
  const worst = tf.max(tf.abs(tf.sub(dxLayer, dxRef))).dataSync()[0];
  assert.ok(scale > 0 && worst <= 1e-4 * scale, `BN gradient off by ${worst} (scale ${scale})`);
});

test('a dropout mask is redrawn identically after reseeding', async () => {
  const input = tf.input({ shape: [64] });
  const model = tf.model({ inputs: input, outputs: tf.layers.dropout({ rate: 0.5 }).apply(input) });
  const x = tf.ones([4, 64]);
  const draw = (seed) => {
    reseed(model, seed);
    return Array.from(model.apply(x, { training: true }).dataSync());
  };
  assert.deepEqual(draw(3), draw(3));
  assert.notDeepEqual(draw(3), draw(4));
  assert.ok(draw(3).some((v) => v === 0));
});

test('AveragePooling2D "same" has the gradient of its forward (TensorFlow\'s)', async () => {
  const input = tf.input({ shape: [5, 5, 2] });
  const pool = tf.layers.averagePooling2d({ poolSize: 3, strides: 2, padding: 'same' }).apply(input);
  const model = await roundTrip(tf.model({ inputs: input, outputs: pool }));
  const x = tf.tensor(Array.from({ length: 50 }, (_, i) => Math.sin(i * 1.3)), [1, 5, 5, 2]);
  const weights = tf.range(1, 19).reshape([1, 3, 3, 2]);
  const forward = model.apply(x);
  assert.ok(tf.max(tf.abs(tf.sub(forward, tf.avgPool(x, 3, 2, 'same')))).dataSync()[0] < 1e-6);
  const g = tf.grad((t) => tf.sum(tf.mul(model.apply(t), weights)))(x).dataSync();
  // tf.nn.avg_pool2d(x, 3, 2, 'SAME') gradient of sum(pool * (1..18)), from TensorFlow 2.19:
  const ref = [0.25, 0.5, 0.75, 1.167, 0.5, 0.667, 1.75, 2.167, 1.25, 1.5];
  ref.forEach((v, i) => assert.ok(Math.abs(g[i] - v) < 1e-3, `grad[${i}] = ${g[i]}, TensorFlow ${v}`));
  // Every one of the 50 entries, exactly: TensorFlow's 'SAME' average divides by the
  // window's cells inside the input (padding excluded), so each output's weight is
  // spread evenly over those cells. Windows start at 2*o - 1 (pad 1 before, 1 after).
  const w = weights.dataSync();
  const exact = new Float64Array(50);
  for (let oi = 0; oi < 3; oi++) {
    for (let oj = 0; oj < 3; oj++) {
      const rows = [2 * oi - 1, 2 * oi, 2 * oi + 1].filter((r) => r >= 0 && r < 5);
      const cols = [2 * oj - 1, 2 * oj, 2 * oj + 1].filter((c) => c >= 0 && c < 5);
      for (let c = 0; c < 2; c++) {
        const share = w[(oi * 3 + oj) * 2 + c] / (rows.length * cols.length);
        for (const r of rows) for (const q of cols) exact[(r * 5 + q) * 2 + c] += share;
      }
    }
  }
  exact.forEach((v, i) =>
    assert.ok(Math.abs(g[i] - v) <= 1e-6 * Math.max(1, Math.abs(v)), `grad[${i}] = ${g[i]}, exact ${v}`),
  );
});
