/**
 * TF.js set-up shared by the CLI, the page and the tests: the cpu backend, and Keras'
 * layer semantics (layers.mjs) registered before any model is loaded.
 *
 * cpu, not wasm or webgl: the wasm backend has no convolution backprop, webgl computes in
 * float16 on many GPUs, and only the same kernels in Node and in a page give the same
 * numbers in both. (tfjs-node would be faster but needs a native binary download.)
 */

import * as tf from '@tensorflow/tfjs';

import { installArrayPool, registerFastKernels } from './kernels.mjs';
import './layers.mjs';

export async function initBackend() {
  // The cpu backend's convolution gradients, pooling gradient and reductions replaced by
  // im2col + matrix-product kernels (kernels.mjs, issue #12): ~60-100x faster gradients.
  registerFastKernels();
  await tf.setBackend('cpu');
  await tf.ready();
  // Output arrays of those kernels are recycled instead of left to V8's full GCs (kernels.mjs).
  installArrayPool(tf.backend());
  // The cpu backend greets Node users with advice to install tfjs-node on first use; the
  // advice does not apply here (see above) and would interleave with the progress output.
  if ('firstUse' in tf.backend()) tf.backend().firstUse = false;
  return tf;
}
