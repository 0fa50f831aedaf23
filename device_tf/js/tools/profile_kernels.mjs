// Per-kernel timings of the cpu backend on the shapes of the zoo's device slices (issue #12):
// each op's forward and forward + gradient, with the backend's own kernels and with
// src/kernels.mjs' replacements. The backend's own slow kernels are timed on a smaller
// batch and scaled linearly (every one of them is linear in the batch) so a run stays short.
// Usage: node tools/profile_kernels.mjs [--size 128] [--batch 16] [--orig-batch 2] [--json FILE]
import { writeFile } from 'node:fs/promises';
import { parseArgs } from 'node:util';

import * as tf from '@tensorflow/tfjs';

import { initBackend } from '../src/backend.mjs';
import { registerFastKernels, restoreKernels } from '../src/kernels.mjs';

const { values: opt } = parseArgs({
  options: {
    size: { type: 'string', default: '128' },
    batch: { type: 'string', default: '16' },
    'orig-batch': { type: 'string', default: '2' },
    json: { type: 'string' },
    only: { type: 'string' },
  },
});
await initBackend();
const size = Number(opt.size);
const batch = Number(opt.batch);
const origBatch = Number(opt['orig-batch']);

const rnd = (shape) => tf.randomUniform(shape, -1, 1, 'float32', 7);
const half = (n, s) => Math.ceil(n / s);
const s2 = half(size, 2); // after the stem's stride 2
const s4 = half(s2, 2);

/** name -> (n) => {forward: () => tensor, both: () => tensors} on batch n */
const CASES = {
  // ResNet50 stem: ZeroPadding2D(3) + Conv2D 7x7/2 valid, 3 -> 64
  'resnet50 conv1 7x7/2 3->64': (n) => {
    const x = rnd([n, size + 6, size + 6, 3]);
    const w = rnd([7, 7, 3, 64]);
    return {
      forward: () => tf.conv2d(x, w, 2, 'valid'),
      both: () => tf.grad((v) => tf.sum(tf.conv2d(x, v, 2, 'valid')))(w),
    };
  },
  // ResNet50: pool1 = ZeroPadding2D(1) + MaxPooling2D 3x3/2 on 64 channels
  'resnet50 pool1 maxpool 3x3/2': (n) => {
    const x = rnd([n, s2 + 2, s2 + 2, 64]);
    return {
      forward: () => tf.maxPool(x, 3, 2, 'valid'),
      both: () => tf.grad((v) => tf.sum(tf.maxPool(v, 3, 2, 'valid')))(x),
    };
  },
  // BatchNormalization's batch moments over N, H, W and their gradient
  'resnet50 conv1_bn moments': (n) => {
    const x = rnd([n, s2, s2, 64]);
    const f = (v) => {
      const { mean, variance } = tf.moments(v, [0, 1, 2]);
      return tf.sum(tf.mul(tf.sub(v, mean), tf.rsqrt(tf.add(variance, 1e-3))));
    };
    return { forward: () => f(x), both: () => tf.grad(f)(x) };
  },
  // ResNet50 conv2_block1: 1x1 64 -> 64 and 3x3 same 64 -> 64 at 1/4 size (A = conv2 stage cuts)
  'resnet50 conv2 3x3 same 64->64': (n) => {
    const x = rnd([n, s4, s4, 64]);
    const w = rnd([3, 3, 64, 64]);
    return {
      forward: () => tf.conv2d(x, w, 1, 'same'),
      both: () => tf.grads((a, v) => tf.sum(tf.conv2d(a, v, 1, 'same')))([x, w]),
    };
  },
  'resnet50 conv2 1x1 64->256': (n) => {
    const x = rnd([n, s4, s4, 64]);
    const w = rnd([1, 1, 64, 256]);
    return {
      forward: () => tf.conv2d(x, w, 1, 'same'),
      both: () => tf.grads((a, v) => tf.sum(tf.conv2d(a, v, 1, 'same')))([x, w]),
    };
  },
  // MobileNetV2 stem: Conv1 3x3/2 same 3 -> 32, then expanded_conv's depthwise 3x3 same
  'mobilenetv2 Conv1 3x3/2 3->32': (n) => {
    const x = rnd([n, size, size, 3]);
    const w = rnd([3, 3, 3, 32]);
    return {
      forward: () => tf.conv2d(x, w, 2, 'same'),
      both: () => tf.grad((v) => tf.sum(tf.conv2d(x, v, 2, 'same')))(w),
    };
  },
  'mobilenetv2 depthwise 3x3 32': (n) => {
    const x = rnd([n, s2, s2, 32]);
    const w = rnd([3, 3, 32, 1]);
    return {
      forward: () => tf.depthwiseConv2d(x, w, 1, 'same'),
      both: () => tf.grads((a, v) => tf.sum(tf.depthwiseConv2d(a, v, 1, 'same')))([x, w]),
    };
  },
  'mobilenetv2 block_1 depthwise 3x3/2 96': (n) => {
    const x = rnd([n, s2 + 1, s2 + 1, 96]);
    const w = rnd([3, 3, 96, 1]);
    return {
      forward: () => tf.depthwiseConv2d(x, w, 2, 'valid'),
      both: () => tf.grads((a, v) => tf.sum(tf.depthwiseConv2d(a, v, 2, 'valid')))([x, w]),
    };
  },
  // MobileNetV2 head: Conv_1 1x1 320 -> 1280 at 1/32 size
  'mobilenetv2 Conv_1 1x1 320->1280': (n) => {
    const x = rnd([n, half(size, 32), half(size, 32), 320]);
    const w = rnd([1, 1, 320, 1280]);
    return {
      forward: () => tf.conv2d(x, w, 1, 'valid'),
      both: () => tf.grads((a, v) => tf.sum(tf.conv2d(a, v, 1, 'valid')))([x, w]),
    };
  },
};

function time(fn, reps = 1) {
  let best = Infinity;
  for (let r = 0; r < reps; r++) {
    const t0 = performance.now();
    const out = fn();
    (Array.isArray(out) ? out : [out]).forEach((t) => t.dataSync());
    best = Math.min(best, performance.now() - t0);
    tf.dispose(out);
  }
  return best / 1000;
}

const rows = [];
for (const [name, make] of Object.entries(CASES)) {
  if (opt.only && !name.includes(opt.only)) continue;
  restoreKernels();
  let c = make(origBatch);
  const scale = batch / origBatch;
  const origFwd = time(c.forward) * scale;
  const origBoth = time(c.both) * scale;
  registerFastKernels();
  c = make(batch);
  time(c.forward); // warm-up (JIT)
  const fastFwd = time(c.forward, 2);
  const fastBoth = time(c.both, 2);
  const row = {
    op: name,
    orig_forward_s: origFwd,
    orig_grad_s: Math.max(origBoth - origFwd, 0),
    fast_forward_s: fastFwd,
    fast_grad_s: Math.max(fastBoth - fastFwd, 0),
  };
  rows.push(row);
  const f = (v) => v.toFixed(3).padStart(8);
  console.log(
    `${name.padEnd(40)} before: fwd ${f(origFwd)} s grad ${f(row.orig_grad_s)} s (${(row.orig_grad_s / origFwd).toFixed(1)}x) | ` +
      `after: fwd ${f(fastFwd)} s grad ${f(row.fast_grad_s)} s (${(row.fast_grad_s / fastFwd).toFixed(1)}x)`,
  );
}
if (opt.json) await writeFile(opt.json, JSON.stringify({ size, batch, origBatch, rows }, null, 1));
