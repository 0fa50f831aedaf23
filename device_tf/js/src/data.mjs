/**
 * Training data for the JS device: a spliteasy frame message with two frames,
 *
 *   x  any non-LABELS kind, float32, NHWC (or NC), shape [N, ...input sample shape]
 *   y  kind LABELS: int32 class indices, layout N, shape [N] (the sparse cross-entropy), or
 *      float32 rows, layout NC, shape [N, K] (one-hot, binary / multi-label or regression
 *      targets: the bundle's other losses, losses.mjs)
 *
 * The codec is the wire codec, so Python writes the file with shared_schema.frame.encode
 * and nothing new has to agree. Batches are taken in file order (step i of an epoch uses
 * rows [i*B, (i+1)*B), the last one possibly short), which is how a test feeds the very
 * same batches to the Python, TFLite and TF.js devices: shuffle when writing the file.
 */

import { DeviceError } from './errors.mjs';
import { FrameKind, decode } from './frame.mjs';

/**
 * Parse a data file's bytes; with `inputSpec` (the manifest's input) check x fits the model,
 * with `manifest` check y is what its loss takes (manifest.labels).
 * Returns {x, y, sampleShape, labelShape, count}: labelShape [] (class indices) or [K].
 */
export function parseData(bytes, inputSpec = undefined, manifest = undefined) {
  const frames = decode(bytes);
  const ys = frames.filter((f) => f.kind === FrameKind.LABELS);
  const xs = frames.filter((f) => f.kind !== FrameKind.LABELS);
  if (frames.length !== 2 || ys.length !== 1 || xs.length !== 1) {
    throw new DeviceError('a data file holds exactly two frames: x and a LABELS frame y');
  }
  const [x] = xs;
  const [y] = ys;
  // float32 features, or int32 token ids when the model's input takes them (an Embedding in A)
  const xDtype = inputSpec?.dtype ?? manifest?.input?.dtype ?? 'float32';
  if (x.dtype !== xDtype) throw new DeviceError(`data x must be ${xDtype}, got ${x.dtype}`);
  const intLabels = y.dtype === 'int32' && y.shape.length === 1;
  const rowLabels = y.dtype === 'float32' && y.shape.length === 2;
  if (!intLabels && !rowLabels) {
    throw new DeviceError(`data y must be int32 of shape [N] or float32 of shape [N, K], got ${y.dtype} [${y.shape}]`);
  }
  if (manifest?.labels) {
    const want = manifest.labels;
    const fits = want.dtype === y.dtype && want.shape.length === y.shape.length && want.shape.slice(1).every((d, i) => d === y.shape[i + 1]);
    if (!fits) {
      throw new DeviceError(
        `data y is ${y.dtype} [${y.shape}], the bundle's ${manifest.loss?.name ?? 'loss'} takes ${want.dtype} [N${want.shape.slice(1).map((d) => `, ${d}`).join('')}]`,
      );
    }
  }
  if (x.shape[0] !== y.shape[0]) throw new DeviceError(`data has ${x.shape[0]} samples but ${y.shape[0]} labels`);
  if (x.shape[0] < 1) throw new DeviceError('data file holds no samples');
  if (inputSpec) {
    const want = inputSpec.shape.slice(1);
    const got = x.shape.slice(1);
    if (want.length !== got.length || want.some((d, i) => d !== got[i])) {
      throw new DeviceError(`data samples are [${got}], the model's input is [${want}]`);
    }
  }
  return { x: x.data, y: y.data, sampleShape: x.shape.slice(1), labelShape: y.shape.slice(1), count: x.shape[0] };
}

/** Label values per sample of parsed data (1 for class indices). */
export function labelSize(data) {
  return (data.labelShape ?? []).reduce((a, b) => a * b, 1);
}

/**
 * The batches of a run, in order: {epoch, index, step, x, y, shape}. `steps` caps the total;
 * `order(data, epoch)`, if given, returns the data reordered for that epoch (shuffle.mjs).
 * x and y are views into the data (no copies).
 */
export function* batches(data, { batchSize, epochs = 1, steps = Infinity, order = undefined }) {
  if (!(batchSize >= 1)) throw new DeviceError(`batch size must be >= 1, got ${batchSize}`);
  const per = data.sampleShape.reduce((a, b) => a * b, 1);
  const ly = labelSize(data);
  let step = 0;
  for (let epoch = 0; epoch < epochs; epoch++) {
    if (step >= steps) return;
    const d = order ? order(data, epoch) : data;
    for (let start = 0, index = 0; start < d.count; start += batchSize, index++) {
      if (step >= steps) return;
      const n = Math.min(batchSize, d.count - start);
      yield {
        epoch,
        index,
        step,
        x: d.x.subarray(start * per, (start + n) * per),
        y: d.y.subarray(start * ly, (start + n) * ly),
        shape: [n, ...d.sampleShape],
      };
      step++;
    }
  }
}

/** How many steps a run takes (for progress bars). */
export function countSteps(data, { batchSize, epochs = 1, steps = Infinity }) {
  return Math.min(steps, epochs * Math.ceil(data.count / batchSize));
}

/**
 * The batches of a run by global step: {total, perEpoch, at(step)} where at(step) is the
 * batch `batches()` yields at that step ({epoch, index, step, x, y, shape}). Batches are a
 * pure function of (order, epoch, position), so a resumed or rolled-back run takes exactly
 * the batch the first run took at that step. The reordered data of one epoch is cached.
 */
export function schedule(data, { batchSize, epochs = 1, steps = Infinity, order = undefined }) {
  if (!(batchSize >= 1)) throw new DeviceError(`batch size must be >= 1, got ${batchSize}`);
  const per = data.sampleShape.reduce((a, b) => a * b, 1);
  const ly = labelSize(data);
  const perEpoch = Math.ceil(data.count / batchSize);
  const total = countSteps(data, { batchSize, epochs, steps });
  let cached = { epoch: -1, d: null };
  return {
    total,
    perEpoch,
    at(step) {
      if (!(Number.isInteger(step) && step >= 0 && step < total)) throw new DeviceError(`no batch for step ${step} of ${total}`);
      const epoch = Math.floor(step / perEpoch);
      const index = step % perEpoch;
      if (cached.epoch !== epoch) cached = { epoch, d: order ? order(data, epoch) : data };
      const { d } = cached;
      const start = index * batchSize;
      const n = Math.min(batchSize, d.count - start);
      return {
        epoch,
        index,
        step,
        x: d.x.subarray(start * per, (start + n) * per),
        y: d.y.subarray(start * ly, (start + n) * ly),
        shape: [n, ...d.sampleShape],
      };
    },
  };
}
