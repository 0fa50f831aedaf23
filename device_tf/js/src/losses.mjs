/**
 * tf_keras' losses in TF.js, for the device when it holds the labels (slice C, double split).
 *
 * Written term for term from tf_keras (backend.py, losses.py), reduction
 * SUM_OVER_BATCH_SIZE (the batch mean of each sample's loss), and checked against
 * tf_keras' own numbers on tests/golden/math.json (test/golden_math.test.mjs):
 *
 *   sparse_categorical_crossentropy  int32 labels (N); on probabilities: log(clip(p)), then
 *                                    the softmax cross-entropy of that
 *   categorical_crossentropy         float labels (N, K); on probabilities: rows normalised
 *                                    to sum 1, clipped, -sum(y log p)
 *   binary_crossentropy              float labels (N, K), mean over K; on logits
 *                                    relu(x) - x z + log1p(exp(-|x|)); on probabilities
 *                                    -(z log(p + eps) + (1 - z) log(1 - p + eps)), p clipped
 *   mean_squared_error / mean_absolute_error   mean over K
 *
 * |d| is written d * sign(d): its gradient is sign(d), 0 at 0 as in TensorFlow (TF.js'
 * own abs has gradient -1 there).
 */
import * as tf from '@tensorflow/tfjs';

import { DeviceError } from './errors.mjs';

const EPS = 1e-7; // tf_keras.backend.epsilon()

export const LOSSES = [
  'sparse_categorical_crossentropy',
  'categorical_crossentropy',
  'binary_crossentropy',
  'mean_squared_error',
  'mean_absolute_error',
];

/** Mean sparse categorical cross-entropy, as Keras computes it. */
export function sparseCrossEntropy(output, labels, numClasses, fromLogits) {
  return tf.tidy(() => {
    let logits = output;
    if (!fromLogits) {
      // Keras: log(clip(p, eps, 1 - eps)), then softmax cross-entropy on those "logits".
      logits = tf.log(tf.clipByValue(output, EPS, 1 - EPS));
    }
    const onehot = tf.oneHot(labels, numClasses);
    return tf.neg(tf.mean(tf.sum(tf.mul(onehot, tf.logSoftmax(logits)), -1)));
  });
}

export function categoricalCrossEntropy(output, target, fromLogits) {
  return tf.tidy(() => {
    if (fromLogits) return tf.neg(tf.mean(tf.sum(tf.mul(target, tf.logSoftmax(output)), -1)));
    const p = tf.clipByValue(tf.div(output, tf.sum(output, -1, true)), EPS, 1 - EPS);
    return tf.neg(tf.mean(tf.sum(tf.mul(target, tf.log(p)), -1)));
  });
}

export function binaryCrossEntropy(output, target, fromLogits) {
  return tf.tidy(() => {
    let elementwise;
    if (fromLogits) {
      // tf.nn.sigmoid_cross_entropy_with_logits
      const negAbs = tf.neg(tf.mul(output, tf.sign(output)));
      elementwise = tf.add(tf.sub(tf.relu(output), tf.mul(output, target)), tf.log1p(tf.exp(negAbs)));
    } else {
      const p = tf.clipByValue(output, EPS, 1 - EPS);
      const pos = tf.mul(target, tf.log(tf.add(p, EPS)));
      const neg = tf.mul(tf.sub(1, target), tf.log(tf.add(tf.sub(1, p), EPS)));
      elementwise = tf.neg(tf.add(pos, neg));
    }
    return tf.mean(tf.mean(elementwise, -1));
  });
}

export function meanSquaredError(output, target) {
  return tf.tidy(() => tf.mean(tf.mean(tf.square(tf.sub(output, target)), -1)));
}

export function meanAbsoluteError(output, target) {
  return tf.tidy(() => {
    const d = tf.sub(output, target);
    return tf.mean(tf.mean(tf.mul(d, tf.sign(d)), -1));
  });
}

/**
 * The manifest's loss ({name, from_logits}) of `output` against `labels` (int32 class
 * indices for the sparse cross-entropy, else float32 shaped like the output).
 */
export function kerasLoss(spec, output, labels, numClasses) {
  const name = spec?.name ?? 'sparse_categorical_crossentropy';
  const fromLogits = spec?.from_logits ?? true;
  switch (name) {
    case 'sparse_categorical_crossentropy':
      return sparseCrossEntropy(output, labels, numClasses, fromLogits);
    case 'categorical_crossentropy':
      return categoricalCrossEntropy(output, labels, fromLogits);
    case 'binary_crossentropy':
      return binaryCrossEntropy(output, labels, fromLogits);
    case 'mean_squared_error':
      return meanSquaredError(output, labels);
    case 'mean_absolute_error':
      return meanAbsoluteError(output, labels);
    default:
      throw new DeviceError(`unknown loss ${name}; the TF.js device trains ${LOSSES.join(', ')}`);
  }
}

/** True when the loss takes int32 class indices (N), false for float rows (N, K). */
export function sparseLabels(spec) {
  return (spec?.name ?? 'sparse_categorical_crossentropy') === 'sparse_categorical_crossentropy';
}

/**
 * The validation score for this loss (as device_tf/losses.py score): accuracy, binary
 * accuracy, or the mean squared / absolute error. outputs: Float32Array (N*K), labels:
 * Int32Array (N) or Float32Array (N*K).
 */
export function score(spec, outputs, labels, units) {
  const name = spec?.name ?? 'sparse_categorical_crossentropy';
  const n = outputs.length / units;
  const argmax = (a, i) => {
    let best = 0;
    for (let j = 1; j < units; j++) if (a[i * units + j] > a[i * units + best]) best = j;
    return best;
  };
  let total = 0;
  if (name === 'sparse_categorical_crossentropy') {
    for (let i = 0; i < n; i++) total += argmax(outputs, i) === labels[i] ? 1 : 0;
    return total / n;
  }
  if (name === 'categorical_crossentropy') {
    for (let i = 0; i < n; i++) total += argmax(outputs, i) === argmax(labels, i) ? 1 : 0;
    return total / n;
  }
  if (name === 'binary_crossentropy') {
    const threshold = spec.from_logits ? 0 : 0.5;
    for (let i = 0; i < outputs.length; i++) total += (outputs[i] > threshold) === (labels[i] > 0.5) ? 1 : 0;
    return total / outputs.length;
  }
  for (let i = 0; i < outputs.length; i++) {
    const d = outputs[i] - labels[i];
    total += name === 'mean_squared_error' ? d * d : Math.abs(d);
  }
  return total / outputs.length;
}

/** What `score` measures, for progress lines. */
export function metricName(spec) {
  return (
    {
      binary_crossentropy: 'binary accuracy',
      mean_squared_error: 'mean squared error',
      mean_absolute_error: 'mean absolute error',
    }[spec?.name] ?? 'accuracy'
  );
}

/** The number of label values per sample: 1 (a class index) or the labels' row size. */
export function labelWidth(manifest) {
  if (sparseLabels(manifest.loss)) return 1;
  return manifest.labels.shape.slice(1).reduce((a, b) => a * b, 1);
}

/** The shape of a batch's labels `y` (a flat typed array): [n] or [n, ...row]. */
export function labelsShape(manifest, y) {
  if (sparseLabels(manifest.loss)) return [y.length];
  return [y.length / labelWidth(manifest), ...manifest.labels.shape.slice(1)];
}

/** A batch's labels as the LABELS frame carries them: Int32Array or Float32Array. */
export function labelsData(manifest, y) {
  return sparseLabels(manifest.loss) ? Int32Array.from(y) : Float32Array.from(y);
}

/** A batch's labels as the tensor the loss takes (int32 [n] or float32 [n, K]). */
export function labelsTensor(manifest, y) {
  return tf.tensor(labelsData(manifest, y), labelsShape(manifest, y), sparseLabels(manifest.loss) ? 'int32' : 'float32');
}
