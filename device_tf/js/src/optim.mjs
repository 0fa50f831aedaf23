/**
 * Optimizers with Keras' update formulas (tf_keras 2.19), written in TF.js ops.
 *
 * TF.js' built-ins differ: its Adam adds epsilon to the bias-corrected sqrt(v_hat) where
 * Keras adds "epsilon hat" to sqrt(v) after folding the correction into the step size, and
 * its momentum optimizer accumulates g (not -lr g). Split training equals unsplit training
 * only if every side steps exactly as Keras would, so the formulas are Keras':
 *
 *   SGD:       w <- w - lr g
 *   momentum:  v <- m v - lr g;  w <- w + v            (Nesterov: w <- w + m v - lr g)
 *   Adam:      alpha = lr sqrt(1 - b2^t) / (1 - b1^t)
 *              m <- m + (g - m)(1 - b1);  v <- v + (g^2 - v)(1 - b2)
 *              w <- w - alpha m / (sqrt(v) + eps)
 *
 * Each slice has its own optimizer; both step once per training step, so t agrees with
 * the unsplit model's iteration count.
 */

import * as tf from '@tensorflow/tfjs';

import { DeviceError } from './errors.mjs';

export class KerasOptimizer {
  /** @param spec the manifest's optimizer ({name: "sgd"|"adam", ...}) */
  constructor(spec) {
    if (spec.name !== 'sgd' && spec.name !== 'adam') throw new DeviceError(`unknown optimizer ${spec.name}`);
    this.spec = { momentum: 0, nesterov: false, beta_1: 0.9, beta_2: 0.999, epsilon: 1e-7, ...spec };
    this.iterations = 0;
    this.slots = new Map(); // variable -> {m, v} (Adam) or {momentum} (SGD with momentum)
  }

  /** Apply one step. `grads` maps variable name -> gradient; `vars` are tf.Variables. */
  apply(vars, grads) {
    this.iterations += 1;
    const s = this.spec;
    tf.tidy(() => {
      for (const v of vars) {
        const g = grads[v.name];
        if (g === undefined) throw new DeviceError(`no gradient for ${v.name}`);
        if (s.name === 'sgd') this.sgd(v, g);
        else this.adam(v, g);
      }
    });
  }

  sgd(v, g) {
    const { learning_rate: lr, momentum: m, nesterov } = this.spec;
    const step = tf.mul(tf.neg(g), lr);
    if (!m) {
      v.assign(tf.add(v, step));
      return;
    }
    const slot = this.slot(v, ['momentum']); // Keras' name for v
    const vel = tf.add(step, tf.mul(slot.momentum, m));
    slot.momentum.assign(vel);
    v.assign(tf.add(v, nesterov ? tf.add(step, tf.mul(vel, m)) : vel));
  }

  adam(v, g) {
    const { learning_rate: lr, beta_1: b1, beta_2: b2, epsilon: eps } = this.spec;
    const t = this.iterations;
    // Keras computes these powers in float32; Math.fround keeps the same rounding points.
    const f = Math.fround;
    const b1p = f(f(b1) ** t);
    const b2p = f(f(b2) ** t);
    const alpha = f((f(lr) * f(Math.sqrt(f(1 - b2p)))) / f(1 - b1p));
    const slot = this.slot(v, ['m', 'v']);
    slot.m.assign(tf.add(slot.m, tf.mul(tf.sub(g, slot.m), 1 - b1)));
    slot.v.assign(tf.add(slot.v, tf.mul(tf.sub(tf.square(g), slot.v), 1 - b2)));
    v.assign(tf.sub(v, tf.div(tf.mul(slot.m, alpha), tf.add(tf.sqrt(slot.v), eps))));
  }

  /** Slot names this optimizer keeps per variable. */
  slotNames() {
    if (this.spec.name === 'adam') return ['m', 'v'];
    return this.spec.momentum ? ['momentum'] : [];
  }

  /**
   * The optimizer's state for a snapshot: {iterations, slots: Map "<name>/<slot>" ->
   * {shape, data}} for the variables `named` ([[name, tf.Variable], ...]) that have slots.
   */
  exportState(named) {
    const slots = new Map();
    for (const [name, v] of named) {
      const slot = this.slots.get(v);
      if (!slot) continue;
      for (const [k, t] of Object.entries(slot)) slots.set(`${name}/${k}`, { shape: t.shape, data: t.dataSync().slice() });
    }
    return { iterations: this.iterations, slots };
  }

  /** Put back a state exportState() returned (slots not in it are dropped: a fresh start). */
  importState(named, { iterations, slots }) {
    this.dispose();
    this.iterations = iterations;
    const byName = new Map(named);
    const grouped = new Map();
    for (const [key, t] of slots) {
      const cut = key.lastIndexOf('/');
      const name = key.slice(0, cut);
      const v = byName.get(name);
      if (!v) throw new DeviceError(`optimizer state names an unknown variable ${name}`);
      if (!this.slotNames().includes(key.slice(cut + 1))) {
        throw new DeviceError(`optimizer state holds slot ${key}, not one of ${this.spec.name}'s`);
      }
      if (!grouped.has(v)) grouped.set(v, {});
      grouped.get(v)[key.slice(cut + 1)] = t;
    }
    for (const [v, held] of grouped) {
      const names = this.slotNames();
      if (names.some((n) => !held[n])) throw new DeviceError(`optimizer state lacks a slot of ${v.name}`);
      const slot = {};
      for (const n of names) {
        const { shape, data } = held[n];
        if (shape.length !== v.shape.length || shape.some((d, i) => d !== v.shape[i])) {
          throw new DeviceError(`optimizer slot ${n} has shape [${shape}], its variable [${v.shape}]`);
        }
        const init = tf.tensor(data, shape, v.dtype);
        slot[n] = tf.variable(init, false);
        init.dispose();
      }
      this.slots.set(v, slot);
    }
  }

  slot(v, names) {
    let slot = this.slots.get(v);
    if (!slot) {
      slot = Object.fromEntries(names.map((n) => [n, tf.variable(tf.zerosLike(v), false)]));
      this.slots.set(v, slot);
    }
    return slot;
  }

  dispose() {
    for (const slot of this.slots.values()) Object.values(slot).forEach((t) => t.dispose());
    this.slots.clear();
  }
}
