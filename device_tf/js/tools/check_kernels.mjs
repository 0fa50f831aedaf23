// Computes, with TF.js' cpu backend as the device runs it (src/kernels.mjs registered by
// initBackend), the forward and gradients of the cases tests/test_js_kernels.py wrote with
// TensorFlow's references. Usage: node tools/check_kernels.mjs CASES.json IN.frames OUT.frames
// CASES = [{name, op: conv|depthwise|maxpool|padconv|padmax|moments, k, stride, pad, x:
// shape, w: shape, zpad}]; IN holds "<name>.x", "<name>.w", "<name>.dy" (flat); OUT holds "<name>.y",
// "<name>.dx", "<name>.dw" (flat) and "kernels.fast" (1 per replaced kernel in use).
import { readFile, writeFile } from 'node:fs/promises';

import * as tf from '@tensorflow/tfjs';

import { initBackend } from '../src/backend.mjs';
import { FAST_KERNELS } from '../src/kernels.mjs';
import { FrameKind, decode, encode, frame } from '../src/frame.mjs';

await initBackend();
const cases = JSON.parse(await readFile(process.argv[2], 'utf8'));
const held = Object.fromEntries(decode(new Uint8Array(await readFile(process.argv[3]))).map((f) => [f.name, f]));
const t = (name, shape) => tf.tensor(held[name].data, shape, 'float32');
const out = [];
const put = (name, tensor) => out.push(frame(FrameKind.ACTIVATION, name, tensor.dataSync(), [tensor.size], 'N', { dtype: 'float32' }));

const zeroPad = (p) => [[0, 0], [p, p], [p, p], [0, 0]];

for (const c of cases) {
  const x = t(`${c.name}.x`, c.x);
  const w = c.w ? t(`${c.name}.w`, c.w) : null;
  const f = {
    conv: (a, v) => tf.conv2d(a, v, c.stride, c.pad),
    depthwise: (a, v) => tf.depthwiseConv2d(a, v, c.stride, c.pad),
    maxpool: (a) => tf.maxPool(a, c.k, c.stride, c.pad),
    // ZeroPadding2D(c.zpad) in front, as ResNet's conv1_pad and pool1_pad (PadV2, Slice)
    padconv: (a, v) => tf.conv2d(tf.pad(a, zeroPad(c.zpad)), v, c.stride, c.pad),
    relu6: (a) => tf.clipByValue(a, 0, 6),
    relu: (a) => tf.relu(a),
    padmax: (a) => tf.maxPool(tf.pad(a, zeroPad(c.zpad)), c.k, c.stride, c.pad),
    moments: (a) => {
      const { mean, variance } = tf.moments(a, [0, 1, 2]);
      return tf.mul(tf.sub(a, mean), tf.rsqrt(tf.add(variance, 1e-3)));
    },
  }[c.op];
  const y = w ? f(x, w) : f(x);
  const dy = t(`${c.name}.dy`, y.shape);
  put(`${c.name}.y`, y);
  if (w) {
    const [dx, dw] = tf.grads((a, v) => tf.sum(tf.mul(f(a, v), dy)))([x, w]);
    put(`${c.name}.dx`, dx);
    put(`${c.name}.dw`, dw);
  } else {
    put(`${c.name}.dx`, tf.grad((a) => tf.sum(tf.mul(f(a), dy)))(x));
  }
}
const fast = Object.keys(FAST_KERNELS).map((name) => (tf.getKernel(name, 'cpu')?.fast ? 1 : 0));
out.push(frame(FrameKind.ACTIVATION, 'kernels.fast', Float32Array.from(fast), [fast.length], 'N', { dtype: 'float32' }));
await writeFile(process.argv[4], encode(out));
