/**
 * Where TF.js layers train differently from Keras, Keras' behaviour is restored here, so a
 * slice trained in TF.js follows the very trajectory the unsplit Keras model would.
 *
 * BatchNormalization, training mode. TF.js' own layer (tfjs-layers 4.22)
 *  - crashes when the layer has no gamma (scale=False, InceptionV3) or no beta
 *    (center=False): it calls this.gamma.read() unconditionally (tfjs #2868);
 *  - feeds the biased batch variance to the moving variance, where Keras' fused kernel
 *    (4-D input, channel axis 1 or 3) feeds the unbiased one (n / (n - 1)).
 * The replacement below is registered under the Keras class name, so models loaded after
 * this module is imported deserialise their BN layers into it. Inference is untouched.
 *
 * AveragePooling2D, padding "same": TF.js' gradient is wrong at the borders (below).
 *
 * Dropout: reseed() gives every Dropout layer a per-step seed, so a step's masks are a
 * function of the step (a redone or resumed step draws the same ones). A's backward no longer
 * recomputes A's forward (slices.mjs keeps its tape), so each mask is drawn once per step.
 */

import * as tf from '@tensorflow/tfjs';

import { batchNormTraining } from './kernels.mjs';

const BaseBN = tf.layers.batchNormalization({}).constructor;

class KerasBatchNormalization extends BaseBN {
  static className = 'BatchNormalization';

  constructor(args = {}) {
    // Keras writes the axis as a list ([3]); TF.js expects a number.
    const axis = Array.isArray(args.axis) ? singleAxis(args.axis) : args.axis;
    super({ ...args, axis });
  }

  call(inputs, kwargs) {
    if (!kwargs?.training) return super.call(inputs, kwargs);
    return tf.tidy(() => {
      const x = Array.isArray(inputs) ? inputs[0] : inputs;
      const ndim = x.rank;
      const axis = this.axis >= 0 ? this.axis : this.axis + ndim;
      const reduce = [...Array(ndim).keys()].filter((i) => i !== axis);
      const bshape = x.shape.map((d, i) => (i === axis ? d : 1));
      const channels = [x.shape[axis]];
      const beta = this.center ? this.beta.read() : tf.zeros(channels);
      const gamma = this.scale ? this.gamma.read() : tf.ones(channels);
      // On the cpu backend (channels last) one op with its own gradient, the same float32
      // numbers in 3 passes instead of ~8 (kernels.mjs, issue #12); else op by op.
      const fusedBN = axis === ndim - 1 ? batchNormTraining(x, gamma, beta, this.epsilon) : null;
      const r = (t) => tf.reshape(t, bshape);
      let y, mean, variance;
      if (fusedBN) ({ y, mean, variance } = fusedBN);
      else {
        ({ mean, variance } = tf.moments(x, reduce));
        // Written out rather than tf.batchNorm: that op records a missing offset/scale as an
        // undefined input (the #2868 crash) and its gradient only reduces rank-1 statistics.
        const factor = tf.mul(tf.rsqrt(tf.add(variance, this.epsilon)), gamma);
        y = tf.add(tf.mul(tf.sub(x, r(mean)), r(factor)), r(beta));
      }
      const n = reduce.reduce((acc, i) => acc * x.shape[i], 1);
      const fused = (ndim === 4 && (axis === 1 || axis === 3)) || (ndim === 5 && (axis === 1 || axis === 4));
      const accVar = fused && n > 1 ? tf.mul(variance, n / (n - 1)) : variance;
      // Keras: moving <- moving - (moving - batch) * (1 - momentum)
      const update = (v, value) => {
        const old = v.read();
        v.write(tf.sub(old, tf.mul(tf.sub(old, value), 1 - this.momentum)));
      };
      update(this.movingMean, mean);
      update(this.movingVariance, accVar);
      return y;
    });
  }
}

/**
 * AveragePooling2D with padding "same": TF.js' forward divides each window by the number of
 * real (unpadded) inputs, as TensorFlow does, but its gradient divides by the full window
 * size at the borders (tfjs-core 4.22 avgPoolGrad), so every gradient through the layer is
 * wrong near the edges -- InceptionV3's branch pools (3x3, stride 1) included. Written here
 * as zero padding + "valid" sum pooling / the count of real inputs per window, whose
 * gradient TF.js gets right.
 */
const BaseAvgPool = tf.layers.averagePooling2d({ poolSize: 2 }).constructor;

class KerasAveragePooling2D extends BaseAvgPool {
  static className = 'AveragePooling2D';

  poolingFunction(inputs, poolSize, strides, padding, dataFormat) {
    if (padding !== 'same' || (dataFormat ?? 'channelsLast') !== 'channelsLast') {
      return super.poolingFunction(inputs, poolSize, strides, padding, dataFormat);
    }
    return tf.tidy(() => {
      const [, h, w] = inputs.shape;
      const [kh, kw] = poolSize;
      const [sh, sw] = strides ?? poolSize;
      const pads = [
        [0, 0],
        samePad(h, kh, sh),
        samePad(w, kw, sw),
        [0, 0],
      ];
      const window = kh * kw;
      const sums = tf.mul(tf.avgPool(tf.pad(inputs, pads), [kh, kw], [sh, sw], 'valid'), window);
      const ones = tf.pad(tf.ones([1, h, w, 1]), pads);
      const counts = tf.mul(tf.avgPool(ones, [kh, kw], [sh, sw], 'valid'), window);
      return tf.div(sums, counts);
    });
  }
}

/**
 * Conv2D in training: TF.js' layer computes through tf.fused.conv2d, whose custom gradient
 * always computes the gradient w.r.t. the layer's input -- also for a slice's first
 * convolution, whose input is data (ResNet's 7x7 stem: ~1.5 s of a 96 px step, discarded).
 * Written as conv2d + bias + activation, each op's registered gradient is evaluated only
 * for the inputs the tape needs (issue #12). Inference keeps the fused op.
 */
const BaseConv2D = tf.layers.conv2d({ filters: 1, kernelSize: 1 }).constructor;

class KerasConv2D extends BaseConv2D {
  static className = 'Conv2D';

  call(inputs, kwargs) {
    if (!kwargs?.training || this.dataFormat !== 'channelsLast' || this.rank !== 2) return super.call(inputs, kwargs);
    return tf.tidy(() => {
      const x = Array.isArray(inputs) ? inputs[0] : inputs;
      const pad = this.padding === 'same' ? 'same' : 'valid';
      let y = tf.conv2d(x, this.kernel.read(), this.strides, pad, 'NHWC', this.dilationRate);
      if (this.bias) y = tf.add(y, this.bias.read());
      return this.activation ? this.activation.apply(y) : y;
    });
  }
}

tf.serialization.registerClass(KerasConv2D);

/** TensorFlow's "same" padding (before, after) of one spatial dimension. */
function samePad(size, k, s) {
  const out = Math.ceil(size / s);
  const total = Math.max((out - 1) * s + k - size, 0);
  return [Math.floor(total / 2), total - Math.floor(total / 2)];
}

tf.serialization.registerClass(KerasAveragePooling2D);

function singleAxis(axes) {
  if (axes.length !== 1) throw new Error(`BatchNormalization over axes [${axes}] is not supported in TF.js`);
  return axes[0];
}

tf.serialization.registerClass(KerasBatchNormalization);

/** Every layer of a (possibly nested) model. */
export function allLayers(model) {
  const out = [];
  for (const layer of model.layers) {
    if (layer.layers) out.push(...allLayers(layer));
    else out.push(layer);
  }
  return out;
}

const DROPOUT = new Set(['Dropout', 'SpatialDropout1D']);
const UNREPEATABLE = new Set(['GaussianNoise', 'GaussianDropout', 'AlphaDropout']);

/** Names of noise layers whose draw cannot be repeated (A cannot hold them). */
export function unrepeatableLayers(model) {
  return allLayers(model)
    .filter((l) => UNREPEATABLE.has(l.getClassName()))
    .map((l) => `${l.name} (${l.getClassName()})`);
}

/**
 * Give each Dropout layer of `model` a seed derived from `stepSeed` (and `offset`, which
 * keeps two models' seeds apart), so a step's masks are a function of the step alone: the
 * recomputed forward draws them again, and a resumed run draws what the first run did.
 */
export function reseed(model, stepSeed, offset = 0) {
  allLayers(model)
    .filter((l) => DROPOUT.has(l.getClassName()))
    .forEach((l, i) => {
      l.seed = (stepSeed * 7919 + offset + i) % 2147483647;
    });
}
