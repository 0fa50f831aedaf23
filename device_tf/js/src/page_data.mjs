/**
 * The page's own data: images the user picks from their disk or phone, decoded in the page.
 *
 * A folder picked with <input webkitdirectory> follows tf_keras' image_dataset_from_directory
 * layout, as `spliteasy train --data FOLDER` does (device_tf/datasets.py): the class is the
 * first folder below the picked one (PICKED/<class>/.../<image>), classes in sorted order
 * give the labels, images directly in PICKED are skipped. Several files picked without a
 * folder take their class from the file name's prefix: `<class>_<anything>.png`.
 * Only .jpeg/.jpg/.png/.bmp/.gif count; files are taken in sorted path order.
 *
 * Decoding follows the Python device step for step, so a PNG gives the same floats on both:
 * the browser's decoder (createImageBitmap, no colour-space conversion) and
 * tf.browser.fromPixels as RGB (RGBA for a 4-channel input), / 255 in float32, bilinear
 * resize with half-pixel centres (tf.image.resize), and tf.image.rgb_to_grayscale's weights
 * for a 1-channel input. The result is a frames message (data.mjs's format), so the worker
 * trains on it exactly as on a data URL; the images never leave the page -- only cut
 * tensors do.
 */
import { comparePaths } from './digest.mjs';
import { DeviceError } from './errors.mjs';
import { FrameKind, encode, frame } from './frame.mjs';

export const IMAGE_SUFFIXES = ['.bmp', '.gif', '.jpeg', '.jpg', '.png'];
const GRAY = [0.2989, 0.587, 0.114]; // tf.image.rgb_to_grayscale
const SCORE_LOSSES = ['sparse_categorical_crossentropy', 'categorical_crossentropy', 'binary_crossentropy'];

const isImage = (name) => !name.startsWith('.') && IMAGE_SUFFIXES.some((s) => name.toLowerCase().endsWith(s));

/**
 * The picked files as a labelled list: {classes (sorted), items: [{file, path, index}]
 * in sorted path order, source (the picked folder's name, or 'N files')}.
 */
export function classify(files) {
  const found = [];
  let root = null;
  for (const file of files) {
    const path = file.webkitRelativePath || file.name;
    const parts = path.split('/');
    const name = parts.at(-1);
    if (parts.length >= 2) root = parts[0];
    if (!isImage(name)) continue;
    let cls;
    if (parts.length >= 3) {
      cls = parts[1];
      if (parts.some((p) => p.startsWith('.'))) continue;
    } else if (parts.length === 2) {
      continue; // directly in the picked folder: no class (tf_keras skips these too)
    } else {
      const cut = name.indexOf('_');
      if (cut < 1) {
        throw new DeviceError(`${name}: cannot tell its class: pick a folder of class subfolders, or name files <class>_<n>.png`);
      }
      cls = name.slice(0, cut);
    }
    found.push({ file, path, cls });
  }
  if (!found.length) {
    throw new DeviceError(
      `${root ?? 'the chosen files'}: empty: no images (${IMAGE_SUFFIXES.map((s) => s.slice(1)).join(', ')}) in class subfolders`,
    );
  }
  const classes = [...new Set(found.map((f) => f.cls))].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
  found.sort((a, b) => comparePaths(a.path, b.path));
  // Python lists class by class (sorted), each class's files sorted: the same order here.
  const items = classes.flatMap((c, index) => found.filter((f) => f.cls === c).map((f) => ({ file: f.file, path: f.path, index })));
  return { classes, items, source: root ?? `${found.length} files` };
}

/** One image -> Float32Array (H*W*C) in [0, 1] for an input of `sampleShape` [H, W, C]. */
export async function decodeImage(tf, file, path, sampleShape) {
  const [h, w, c] = sampleShape;
  let bitmap;
  try {
    bitmap = await createImageBitmap(file, { colorSpaceConversion: 'none', premultiplyAlpha: 'none' });
  } catch (err) {
    throw new DeviceError(`${path}: unreadable or truncated image (${err.message})`);
  }
  try {
    return tf.tidy(() => {
      const pixels = tf.browser.fromPixels(bitmap, c === 4 ? 4 : 3);
      let x = tf.div(tf.cast(pixels, 'float32'), 255);
      x = tf.image.resizeBilinear(x, [h, w], false, true);
      if (c === 1) x = tf.sum(tf.mul(x, tf.tensor1d(GRAY)), -1, true);
      return x.dataSync().slice();
    });
  } finally {
    bitmap.close?.();
  }
}

/**
 * Class indices -> the labels the bundle's loss takes (as device_tf/datasets.py's
 * labels_from_classes): {data, shape, layout}.
 */
export function labelsFor(manifest, indices, classes) {
  const loss = manifest.loss?.name ?? 'sparse_categorical_crossentropy';
  const outputs = manifest.num_classes;
  const n = indices.length;
  if (!SCORE_LOSSES.includes(loss)) {
    throw new DeviceError(`class folders give class labels, but the model trains ${loss} (regression)`);
  }
  if (loss === 'binary_crossentropy' && outputs === 1) {
    if (classes.length > 2) throw new DeviceError(`${classes.length} classes, but the model has one binary output (two classes)`);
    return { data: Float32Array.from(indices), shape: [n, 1], layout: 'NC' };
  }
  if (classes.length > outputs) {
    const shown = classes.slice(0, 6).join(', ') + (classes.length > 6 ? ', ...' : '');
    throw new DeviceError(`${classes.length} classes (${shown}), more than the model's ${outputs} outputs`);
  }
  if (loss === 'sparse_categorical_crossentropy') return { data: Int32Array.from(indices), shape: [n], layout: 'N' };
  const data = new Float32Array(n * outputs);
  indices.forEach((k, i) => {
    data[i * outputs + k] = 1;
  });
  return { data, shape: [n, outputs], layout: 'NC' };
}

/**
 * Picked files -> {bytes (a frames message: x and labels), classes, count, source} for the
 * manifest's model. onProgress(done, total) after each image.
 */
export async function imagesToFrames(tf, files, manifest, onProgress = () => {}) {
  const shape = manifest.input.shape.slice(1);
  if (shape.length !== 3 || ![1, 3, 4].includes(shape[2])) {
    throw new DeviceError(`images cannot feed a model input of shape [${shape}] (height, width, 1/3/4 channels)`);
  }
  const { classes, items, source } = classify(files);
  const labels = labelsFor(manifest, items.map((it) => it.index), classes);
  const per = shape.reduce((a, b) => a * b, 1);
  const x = new Float32Array(items.length * per);
  for (let i = 0; i < items.length; i++) {
    x.set(await decodeImage(tf, items[i].file, items[i].path, shape), i * per);
    onProgress(i + 1, items.length);
  }
  const bytes = encode([
    frame(FrameKind.ACTIVATION, manifest.input.name, x, [items.length, ...shape], 'NHWC'),
    frame(FrameKind.LABELS, 'labels', labels.data, labels.shape, labels.layout),
  ]);
  return { bytes, classes, count: items.length, source };
}
