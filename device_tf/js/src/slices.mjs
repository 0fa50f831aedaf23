/**
 * The device's half of the network in TF.js: slices A (and C) as trainable layers models.
 * Same protocol as device_tf/runtime.py's DeviceRuntime, so one step loop drives it:
 *
 *   a = rt.aForward(x)              A in training mode
 *   {loss, gB} = rt.cTrain(b, y)    C forward, loss, dL/db, C's update
 *   rt.aBackward(gA)                A's update from the upstream gradient
 *
 * TF.js records gradients only inside a synchronous tf.variableGrads call, and the server
 * round trip sits between A's forward and A's backward. So aForward records A(x) on a tape
 * of TF.js' engine of its own (ForwardTape below: the tensors each op's gradient needs are
 * kept, as TF.js keeps them inside variableGrads), and aBackward resumes that tape: the
 * gradient of sum(A(x) * gA) w.r.t. A's variables is exactly the vector-Jacobian product
 * dL/dθ_A, without computing A's forward a second time (it was ~40% of a ResNet50
 * stem/head step, issue #12). A's BN moving statistics are updated once, by the one
 * forward; Dropout draws its mask once.
 */

import * as tf from '@tensorflow/tfjs';

import { DeviceError } from './errors.mjs';
import { allLayers, reseed, unrepeatableLayers } from './layers.mjs';
import { kerasLoss } from './losses.mjs';
import { KerasOptimizer } from './optim.mjs';

/**
 * A TF.js layers model from the files of a tfjs_layers artefact.
 * @param {object} modelJson parsed model.json
 * @param {(path: string) => Promise<ArrayBuffer>} readShard reads a shard named in model.json
 */
export async function loadLayersModel(modelJson, readShard) {
  const specs = [];
  const buffers = [];
  for (const group of modelJson.weightsManifest) {
    specs.push(...group.weights);
    for (const path of group.paths) buffers.push(new Uint8Array(await readShard(path)));
  }
  const weightData = new Uint8Array(buffers.reduce((n, b) => n + b.length, 0));
  let pos = 0;
  for (const b of buffers) {
    weightData.set(b, pos);
    pos += b.length;
  }
  const artifacts = {
    modelTopology: modelJson.modelTopology,
    weightSpecs: specs,
    weightData: weightData.buffer,
    format: modelJson.format,
    generatedBy: modelJson.generatedBy,
    convertedBy: modelJson.convertedBy,
  };
  try {
    return await tf.loadLayersModel(tf.io.fromMemory(artifacts));
  } catch (err) {
    throw new DeviceError(`TF.js cannot load the slice: ${err.message}`);
  }
}

// The losses live in losses.mjs; sparseCrossEntropy stays importable from here.
export { sparseCrossEntropy } from './losses.mjs';

/** `value` plus the model's weight penalties (kernel_regularizer etc.), if it has any. */
function addPenalties(value, model) {
  const penalties = model.calculateLosses();
  return penalties.length ? tf.addN([value, ...penalties]) : value;
}

/**
 * One forward pass recorded on TF.js' gradient tape and kept open until its backward.
 *
 * TF.js' engine records ops on `state.activeTape` while `state.gradientDepth > 0`, keeping
 * (clones of) the tensors each op's gradient needs; engine.gradients() normally opens and
 * closes that tape around one synchronous function. Here the forward is recorded with the
 * engine's own startTape/endTape, the tape is set aside (the engine's slot is cleared, so
 * C's variableGrads in between records on a fresh tape of its own), and backward() puts it
 * back one level deep -- which is how engine.gradients() nests (higher-order gradients):
 * variableGrads then appends the seed op to the recorded tape and backpropagates through
 * all of it. The kept tensors are released after the backward, or by dispose().
 */
class ForwardTape {
  /** Runs f() with the tape on; f's result is returned and stays on the tape. */
  constructor(f) {
    const engine = tf.engine();
    if (engine.state.gradientDepth !== 0) throw new DeviceError('A forward recorded inside another gradient');
    engine.startTape();
    try {
      this.output = f();
    } finally {
      engine.endTape();
      this.nodes = engine.state.activeTape;
      engine.state.activeTape = null;
    }
  }

  /**
   * tf.variableGrads(f, vars) where f may use the forward's tensors (its output): the
   * gradients flow through the recorded forward. Releases the tape.
   */
  variableGrads(f, vars) {
    if (!this.nodes) throw new DeviceError('the forward tape was already used');
    const engine = tf.engine();
    if (engine.state.gradientDepth !== 0) throw new DeviceError('A backward inside another gradient');
    engine.state.activeTape = this.nodes;
    engine.state.gradientDepth += 1;
    try {
      return tf.variableGrads(f, vars);
    } finally {
      engine.state.gradientDepth -= 1;
      this.nodes = engine.state.activeTape; // the forward's nodes and those variableGrads added
      engine.state.activeTape = null;
      this.dispose();
    }
  }

  dispose() {
    for (const node of this.nodes ?? []) for (const t of node.saved ?? []) t.dispose();
    this.nodes = null;
  }
}

/**
 * Whether the current backend reads results back only asynchronously (TF.js 4.22's webgpu:
 * dataSync() returns zeros there and leaves the device unusable), so callers await data().
 */
export function asyncReads() {
  return tf.getBackend() === 'webgpu';
}

/** Keeps C's Dropout seeds apart from A's for the same step. */
const C_SEED_OFFSET = 1000003;

export class TfjsSlices {
  /**
   * @param manifest the validated manifest
   * @param {{A: tf.LayersModel, C?: tf.LayersModel}} models
   */
  constructor(manifest, models) {
    this.name = 'tfjs';
    this.manifest = manifest;
    this.a = models.A;
    this.c = models.C ?? null;
    if (manifest.split_mode === 'double' && !this.c) throw new DeviceError('a double split needs slice C');
    const noisy = unrepeatableLayers(this.a);
    if (noisy.length) {
      throw new DeviceError(`slice A holds noise layers TF.js cannot replay for backward: ${noisy.join(', ')}`);
    }
    this.optA = new KerasOptimizer(manifest.optimizer);
    this.optC = this.c ? new KerasOptimizer(manifest.optimizer) : null;
    this.tape = null; // A's last forward, recorded for aBackward
    this.stepSeed = 0;
  }

  /** A(x) in training mode, recorded for aBackward. */
  aForward(x) {
    this.dropTape();
    this.stepSeed += 1;
    reseed(this.a, this.stepSeed);
    // The returned tensor is the caller's to dispose; the tape keeps a clone of it (the same
    // data, recorded as an identity op) for the backward's seed sum(a * gA).
    let out = null;
    const tape = new ForwardTape(() => {
      out = this.a.apply(x, { training: true });
      return tf.keep(tf.clone(out));
    });
    this.tape = tape;
    return out;
  }

  /** Backpropagate dL/da through A's recorded forward (the last aForward), and update A. */
  aBackward(gA) {
    if (!this.tape) throw new DeviceError('aBackward without aForward');
    const tape = this.tape;
    this.tape = null;
    const vars = this.a.trainableWeights.map((w) => w.read());
    try {
      if (vars.length) {
        // sum(A(x) * gA) has gradient gA^T dA/dθ; A's weight penalties join it here, as
        // they reach A's gradients in unsplit training (but no reported loss).
        const { value, grads } = tape.variableGrads(
          () => addPenalties(tf.sum(tf.mul(tape.output, gA)), this.a),
          vars,
        );
        this.optA.apply(vars, grads);
        value.dispose();
        tf.dispose(grads);
      }
    } finally {
      tape.dispose();
      tape.output.dispose();
    }
  }

  /** Forget a recorded forward that will not be backpropagated (a redone or restored step). */
  dropTape() {
    if (!this.tape) return;
    this.tape.dispose();
    this.tape.output.dispose();
    this.tape = null;
  }

  /**
   * C forward, loss and update of C; returns {loss: number, gB: tf.Tensor}. The loss
   * includes C's weight penalties, as Keras reports it. On a backend that reads back only
   * asynchronously (webgpu: its dataSync() returns zeros) the loss is not read here:
   * {loss: NaN, lossTensor, gB}, and the caller awaits lossTensor.data() and disposes it.
   */
  cTrain(b, y) {
    if (!this.c) throw new DeviceError('a single split holds no slice C');
    const bVar = tf.variable(b, true);
    const vars = this.c.trainableWeights.map((w) => w.read());
    const { num_classes: k, loss } = this.manifest;
    reseed(this.c, this.stepSeed, C_SEED_OFFSET); // C's Dropout masks: a function of the step too
    try {
      const { value, grads } = tf.variableGrads(
        () => addPenalties(kerasLoss(loss, this.c.apply(bVar, { training: true }), y, k), this.c),
        [bVar, ...vars],
      );
      const gB = grads[bVar.name];
      this.optC.apply(vars, grads);
      tf.dispose(vars.map((v) => grads[v.name]));
      if (asyncReads()) return { loss: NaN, lossTensor: value, gB };
      const lossValue = value.dataSync()[0];
      value.dispose();
      return { loss: lossValue, gB };
    } finally {
      bVar.dispose();
    }
  }

  /**
   * Everything a snapshot must hold to continue exactly (state.mjs): the variables of each
   * slice (as weights()), each slice's optimizer state (slots named "<slice>/<layer>/<var>/
   * <slot>", the iteration count), and the Dropout seed counter.
   */
  exportState() {
    const optimizers = {};
    for (const [name, model, opt] of this.parts()) optimizers[name] = opt.exportState(this.trainables(model));
    return { weights: this.weights(), optimizers, stepSeed: this.stepSeed };
  }

  /**
   * Download every variable and optimizer slot where the backend reads back only
   * asynchronously (webgpu), so exportState() and weights(), which read synchronously, get
   * the values (TF.js caches what an async read downloaded). Nothing to do on cpu/webgl.
   */
  async prefetch() {
    if (!asyncReads()) return;
    const tensors = [];
    for (const [, model, opt] of this.parts()) {
      tensors.push(...allLayers(model).flatMap((layer) => layer.weights.map((w) => w.read())));
      for (const slot of opt.slots.values()) tensors.push(...Object.values(slot));
    }
    await Promise.all(tensors.map((t) => t.data()));
  }

  /** Put back what exportState() returned (any earlier or later state of the same slices). */
  importState({ weights, optimizers, stepSeed }) {
    for (const [name, model, opt] of this.parts()) {
      const held = weights[name];
      if (!held) throw new DeviceError(`the state holds no variables of slice ${name}`);
      const vars = allLayers(model).flatMap((layer) => layer.weights);
      const missing = vars.filter((w) => !held[w.originalName]).map((w) => w.originalName);
      const extra = Object.keys(held).filter((k) => !vars.some((w) => w.originalName === k));
      if (missing.length || extra.length) {
        throw new DeviceError(
          `the state's slice ${name} is not this bundle's: missing [${missing.join(', ')}], unknown [${extra.join(', ')}]`,
        );
      }
      for (const w of vars) {
        const { shape, data } = held[w.originalName];
        if (shape.length !== w.shape.length || shape.some((d, i) => d !== w.shape[i])) {
          throw new DeviceError(`the state's ${name}/${w.originalName} has shape [${shape}], the slice [${w.shape}]`);
        }
        const t = tf.tensor(data, shape, w.dtype);
        w.write(t);
        t.dispose();
      }
      opt.importState(this.trainables(model), optimizers[name] ?? { iterations: 0, slots: new Map() });
    }
    this.stepSeed = stepSeed;
    this.dropTape();
  }

  /** [[slice name, model, optimizer], ...] for the slices held here. */
  parts() {
    return [
      ['A', this.a, this.optA],
      ['C', this.c, this.optC],
    ].filter(([, model]) => model);
  }

  /** [[name, tf.Variable], ...] of a model's trainable variables, as the optimizer sees them. */
  trainables(model) {
    return model.trainableWeights.map((w) => [w.originalName, w.read()]);
  }

  aInfer(x) {
    return this.a.apply(x, { training: false });
  }

  cInfer(b) {
    if (!this.c) throw new DeviceError('a single split holds no slice C');
    return this.c.apply(b, { training: false });
  }

  /** Loss of the whole device+server network is the caller's; this is C's loss alone. */
  loss(output, labels) {
    return kerasLoss(this.manifest.loss, output, labels, this.manifest.num_classes);
  }

  /**
   * Current variables of each slice, layer by layer (trainable and not), named and ordered
   * like device_tf.keras_util.named_variables: {A: {"layer/var": {shape, data}}, C: {...}}.
   */
  weights() {
    const out = {};
    for (const [name, model] of [['A', this.a], ['C', this.c]]) {
      if (!model) continue;
      out[name] = Object.fromEntries(
        allLayers(model)
          .flatMap((layer) => layer.weights)
          .map((w) => [w.originalName, { shape: w.shape, data: w.read().dataSync().slice() }]),
      );
    }
    return out;
  }

  dispose() {
    this.optA.dispose();
    this.optC?.dispose();
    this.dropTape();
    this.a.dispose();
    this.c?.dispose();
  }
}
