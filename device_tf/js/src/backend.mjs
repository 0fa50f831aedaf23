/**
 * TF.js set-up shared by the CLI, the page and the tests: the cpu backend, and Keras'
 * layer semantics (layers.mjs) registered before any model is loaded.
 *
 * cpu, not wasm or webgl: the wasm backend has no convolution backprop, webgl computes in
 * float16 on many GPUs, and only the same kernels in Node and in a page give the same
 * numbers in both. (tfjs-node would be faster but needs a native binary download.)
 */

import * as tf from '@tensorflow/tfjs';

import './layers.mjs';

export async function initBackend() {
  await tf.setBackend('cpu');
  await tf.ready();
  // The cpu backend greets Node users with advice to install tfjs-node on first use; the
  // advice does not apply here (see above) and would interleave with the progress output.
  if ('firstUse' in tf.backend()) tf.backend().firstUse = false;
  return tf;
}
