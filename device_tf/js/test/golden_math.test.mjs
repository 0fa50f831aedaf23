/**
 * TF.js' math against tf_keras' own numbers (tests/golden/math.json, written by
 * tests/golden/make_math.py): KerasOptimizer (SGD, momentum, Nesterov, Adam), the
 * Keras-exact BatchNormalization of layers.mjs (training forward/backward and moving
 * statistics), sparseCrossEntropy on logits and probabilities and kerasLoss's other losses
 * (categorical / binary cross-entropy, MSE, MAE; losses.mjs), within 1e-6 relative
 * to each tensor's largest magnitude. tests/test_golden_math.py holds the Python twins.
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';

import * as tf from '@tensorflow/tfjs';

import '../src/layers.mjs'; // registers the Keras-exact BatchNormalization
import { KerasOptimizer } from '../src/optim.mjs';
import { kerasLoss } from '../src/losses.mjs';
import { sparseCrossEntropy } from '../src/slices.mjs';

await tf.setBackend('cpu');
const golden = JSON.parse(readFileSync(new URL('../../../tests/golden/math.json', import.meta.url), 'utf8'));
const TOL = 1e-6;

function assertClose(got, want, what) {
  const g = Array.from(got.flat ? got.flat(Infinity) : got);
  const w = [want].flat(Infinity);
  assert.equal(g.length, w.length, `${what}: ${g.length} values, want ${w.length}`);
  const scale = Math.max(...w.map(Math.abs), 1e-30);
  const err = Math.max(0, ...g.map((v, i) => Math.abs(v - w[i]))) / scale;
  assert.ok(err <= TOL, `${what}: relative error ${err.toExponential(2)} > ${TOL}`);
}

for (const [key, c] of Object.entries(golden.optimizers)) {
  test(`KerasOptimizer ${key}`, () => {
    const v = tf.variable(tf.tensor(c.w0), true, 'w');
    const opt = new KerasOptimizer(c.spec);
    c.grads.forEach((g, i) => {
      opt.apply([v], { w: tf.tensor(g) });
      assertClose(v.dataSync(), c.after[i], `${key} step ${i + 1}`);
    });
    v.dispose();
  });
}

for (const [key, c] of Object.entries(golden.batchnorm)) {
  test(`Keras-exact BatchNormalization ${key}`, () => {
    const [Cls] = tf.serialization.SerializationMap.getMap().classNameMap.BatchNormalization;
    const layer = new Cls({ axis: -1, momentum: c.momentum, epsilon: c.epsilon });
    const x = tf.tensor(c.x);
    layer.build(x.shape);
    layer.setWeights([tf.tensor(c.gamma), tf.tensor(c.beta), tf.tensor(c.moving_mean), tf.tensor(c.moving_variance)]);
    const dy = tf.tensor(c.dy);
    let y;
    const { value, grads } = tf.variableGrads(() => {
      y = tf.keep(layer.apply(x, { training: true }));
      return tf.sum(tf.mul(y, dy));
    }, layer.trainableWeights.map((w) => w.read()));
    value.dispose();
    const [gamma, beta] = layer.trainableWeights.map((w) => w.read().name);
    assertClose(y.dataSync(), c.y, `${key} y`);
    assertClose(grads[gamma].dataSync(), c.dgamma, `${key} dgamma`);
    assertClose(grads[beta].dataSync(), c.dbeta, `${key} dbeta`);
    const [, , movingMean, movingVar] = layer.getWeights();
    assertClose(movingMean.dataSync(), c.new_moving_mean, `${key} moving mean`);
    assertClose(movingVar.dataSync(), c.new_moving_variance, `${key} moving variance`);
    // dx with the statistics put back (the layer updates them on every training call)
    layer.setWeights([tf.tensor(c.gamma), tf.tensor(c.beta), tf.tensor(c.moving_mean), tf.tensor(c.moving_variance)]);
    const dx = tf.grad((input) => tf.sum(tf.mul(layer.apply(input, { training: true }), dy)))(x);
    assertClose(dx.dataSync(), c.dx, `${key} dx`);
  });
}

for (const [key, c] of Object.entries(golden.sparse_categorical_crossentropy)) {
  test(`sparseCrossEntropy ${key}`, () => {
    const out = tf.tensor(c.output);
    const labels = tf.tensor1d(c.labels, 'int32');
    const k = out.shape[1];
    const loss = sparseCrossEntropy(out, labels, k, c.from_logits);
    assertClose(loss.dataSync(), c.loss, `${key} loss`);
    const grad = tf.grad((o) => sparseCrossEntropy(o, labels, k, c.from_logits))(out);
    assertClose(grad.dataSync(), c.grad, `${key} gradient`);
  });
}

for (const [key, c] of Object.entries(golden.losses)) {
  test(`kerasLoss ${key}`, () => {
    const out = tf.tensor(c.output);
    const labels = tf.tensor(c.labels);
    const spec = { name: c.name, from_logits: c.from_logits };
    const loss = kerasLoss(spec, out, labels, out.shape[1]);
    assertClose(loss.dataSync(), c.loss, `${key} loss`);
    const grad = tf.grad((o) => kerasLoss(spec, o, labels, out.shape[1]))(out);
    assertClose(grad.dataSync(), c.grad, `${key} gradient`);
  });
}

test('aux label: c_hat = c - g and back', () => {
  const c = tf.tensor(golden.aux_label.c);
  const g = tf.tensor(golden.aux_label.grad);
  assertClose(tf.sub(c, g).dataSync(), golden.aux_label.c_hat, 'c_hat');
});
