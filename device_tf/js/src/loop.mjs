/**
 * The device's step loop: runtime (slices.mjs) + codec (frame.mjs) + transport, kept apart
 * -- the same loop as device_tf/loop.py, with the same per-step metrics:
 *
 *   {step, loss, device_ms, server_ms, codec_ms, wire_ms, total_ms, bytes_up, bytes_down}
 *
 * device = A and C compute here, server = the server's X-Spliteasy-Server-Ms, codec =
 * encode + decode here, wire = the rest of each round trip.
 *
 * Double split, two round trips per step:
 *   a = A(x)  --forward(a)-->  b = B(a);  loss, g_b, C step;  --backward(g_b)-->  g_a;  A step
 * Single split, one round trip: step(a, labels) -> (g_a, loss).
 */

import * as tf from '@tensorflow/tfjs';

import { DeviceError } from './errors.mjs';
import { FrameKind, check, decode, encode, frame, sessionBytes } from './frame.mjs';

const now = () => globalThis.performance.now();

function sameBytes(a, b) {
  return a.length === b.length && a.every((v, i) => v === b[i]);
}

export class SplitTrainer {
  /**
   * @param runtime a TfjsSlices
   * @param transport an HttpTransport
   * @param manifest the validated manifest; manifestSha256 the hash of its file's bytes
   */
  constructor(runtime, transport, manifest, manifestSha256, { auxLabel = false } = {}) {
    this.rt = runtime;
    this.transport = transport;
    this.manifest = manifest;
    this.manifestSha256 = manifestSha256;
    this.auxLabel = auxLabel;
    this.session = null;
    this.sessionId = '';
    this.nextStep = 0;
  }

  async open() {
    const reply = await this.transport.postJson('/v1/sessions', {
      manifest_sha256: this.manifestSha256,
      aux_label: this.auxLabel,
    });
    this.sessionId = reply.session_id;
    this.session = sessionBytes(reply.session_id);
    this.transport.token = reply.token;
    this.nextStep = Number(reply.next_step ?? 0);
  }

  async close() {
    if (this.session) {
      await this.transport.delete(`/v1/sessions/${this.sessionId}`);
      this.session = null;
    }
  }

  async call(t, endpoint, frames) {
    let t0 = now();
    const body = encode(frames);
    t.codec_ms += now() - t0;
    const reply = await this.transport.postFrames(`/v1/sessions/${this.sessionId}/${endpoint}`, body);
    t0 = now();
    const out = decode(reply.body);
    t.codec_ms += now() - t0;
    t.server_ms += reply.serverMs;
    t.wire_ms += Math.max(reply.roundTripMs - reply.serverMs, 0);
    t.bytes_up += body.length;
    t.bytes_down += reply.body.length;
    return out;
  }

  frameOf(kind, spec, data, shape, step) {
    return frame(kind, spec.name, data, shape, spec.layout, { session: this.session, step, dtype: spec.dtype });
  }

  expect(frames, kind, spec, step) {
    const f = frames.find((x) => x.name === spec.name);
    if (!f) throw new DeviceError(`server reply lacks tensor '${spec.name}'`);
    check(f, spec, kind);
    if (f.step !== step || !sameBytes(f.session, this.session)) {
      throw new DeviceError(`server reply is for step ${f.step}, expected ${step}`);
    }
    return f;
  }

  /** Time a synchronous runtime call as device compute (the cpu backend is synchronous). */
  device(t, fn) {
    const t0 = now();
    const out = fn();
    t.device_ms += now() - t0;
    return out;
  }

  /**
   * One training step on a batch: x a Float32Array (NHWC, C order) of shape `shape`,
   * y an Int32Array of labels. Returns the metrics record.
   */
  async step(x, y, shape) {
    if (!this.session) await this.open();
    const m = this.manifest;
    const step = this.nextStep;
    const t = { device_ms: 0, server_ms: 0, codec_ms: 0, wire_ms: 0, total_ms: 0, bytes_up: 0, bytes_down: 0 };
    const start = now();
    const down = this.auxLabel ? FrameKind.TARGET : FrameKind.GRADIENT;
    const keep = [];
    try {
      const xT = tf.tensor(x, shape, 'float32');
      keep.push(xT);
      const a = this.device(t, () => this.rt.aForward(xT));
      keep.push(a);
      const aData = this.device(t, () => a.dataSync());
      let reply;
      let loss;
      if (m.split_mode === 'double') {
        reply = await this.call(t, 'forward', [this.frameOf(FrameKind.ACTIVATION, m.cuts[0], aData, a.shape, step)]);
        const bf = this.expect(reply, FrameKind.ACTIVATION, m.cuts[1], step);
        const { gBData, lossValue } = this.device(t, () => {
          const b = tf.tensor(bf.data, bf.shape, 'float32');
          const yT = tf.tensor1d(y, 'int32');
          const { loss: l, gB } = this.rt.cTrain(b, yT);
          // auxiliary label: b_hat = b - dL/db
          const up = this.auxLabel ? tf.sub(b, gB) : gB;
          const data = up.dataSync();
          tf.dispose([b, yT, gB, up]);
          return { gBData: data, lossValue: l };
        });
        loss = lossValue;
        reply = await this.call(t, 'backward', [this.frameOf(down, m.cuts[1], gBData, bf.shape, step)]);
      } else {
        reply = await this.call(t, 'step', [
          this.frameOf(FrameKind.ACTIVATION, m.cuts[0], aData, a.shape, step),
          this.frameOf(FrameKind.LABELS, m.labels, Int32Array.from(y), [y.length], step),
        ]);
        const lf = reply.find((f) => f.kind === FrameKind.SCALAR && f.name === 'loss');
        if (!lf) throw new DeviceError('server reply lacks the loss');
        loss = Number(lf.data[0]);
      }
      const gf = this.expect(reply, down, m.cuts[0], step);
      this.device(t, () => {
        const g = tf.tensor(gf.data, gf.shape, 'float32');
        // auxiliary label: the server sent a_hat = a - dL/da, so dL/da = a - a_hat
        const gA = this.auxLabel ? tf.sub(a, g) : g;
        this.rt.aBackward(gA);
        tf.dispose([g, gA]);
      });
      this.nextStep = step + 1;
      t.total_ms = now() - start;
      return { step, loss, ...t };
    } finally {
      tf.dispose(keep);
    }
  }

  /** The model's output for a batch (A and C here, B on the server in inference mode). */
  async predict(x, shape) {
    if (!this.session) await this.open();
    const m = this.manifest;
    const t = { device_ms: 0, server_ms: 0, codec_ms: 0, wire_ms: 0, bytes_up: 0, bytes_down: 0 };
    const xT = tf.tensor(x, shape, 'float32');
    const a = this.rt.aInfer(xT);
    const reply = await this.call(t, 'infer', [
      this.frameOf(FrameKind.ACTIVATION, m.cuts[0], a.dataSync(), a.shape, this.nextStep),
    ]);
    tf.dispose([xT, a]);
    const out = m.split_mode === 'double' ? m.cuts[1] : m.output;
    const f = this.expect(reply, FrameKind.ACTIVATION, out, this.nextStep);
    if (m.split_mode !== 'double') return { data: f.data, shape: f.shape };
    const b = tf.tensor(f.data, f.shape, 'float32');
    const y = this.rt.cInfer(b);
    const result = { data: y.dataSync().slice(), shape: y.shape };
    tf.dispose([b, y]);
    return result;
  }
}

/** Fraction of argmax(output) == y. */
export function accuracy(output, labels) {
  const k = output.shape[1];
  let hits = 0;
  for (let i = 0; i < labels.length; i++) {
    let best = 0;
    for (let j = 1; j < k; j++) if (output.data[i * k + j] > output.data[i * k + best]) best = j;
    if (best === labels[i]) hits++;
  }
  return hits / labels.length;
}

/**
 * Train over `batchIter` (data.mjs batches), calling onStep(record, batch) after each step.
 * Returns the records.
 */
export async function train(trainer, batchIter, { onStep = () => {} } = {}) {
  const records = [];
  for (const batch of batchIter) {
    const rec = await trainer.step(batch.x, batch.y, batch.shape);
    rec.epoch = batch.epoch;
    records.push(rec);
    await onStep(rec, batch);
  }
  return records;
}
