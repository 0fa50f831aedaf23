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

import { DeviceError, ProtocolError, StepConflict } from './errors.mjs';
import { codecFlag, compressible } from './codec.mjs';
import { FrameKind, check, decode, encode, frame, kindName, sessionBytes } from './frame.mjs';
import { labelsData, labelsShape, labelsTensor } from './losses.mjs';
import { restoreSnapshot, takeSnapshot } from './state.mjs';

const now = () => globalThis.performance.now();

function sameBytes(a, b) {
  return a.length === b.length && a.every((v, i) => v === b[i]);
}

export class SplitTrainer {
  /**
   * @param runtime a TfjsSlices
   * @param transport the session interface of transport.mjs (openSession, attach,
   *   exchange, closeSession): the loop builds no URL and holds no token
   * @param manifest the validated manifest; manifestSha256 the hash of its file's bytes
   * @param codec the wire codec to ask for when the session opens (codec.mjs): its
   *   ACTIVATION and GRADIENT frames then travel in it, both ways
   */
  constructor(runtime, transport, manifest, manifestSha256, { auxLabel = false, codec = 'float32' } = {}) {
    codecFlag(codec); // an unknown name fails here, before any traffic
    this.codec = codec;
    this.rt = runtime;
    this.transport = transport;
    this.manifest = manifest;
    this.manifestSha256 = manifestSha256;
    this.auxLabel = auxLabel;
    this.session = null;
    this.sessionId = '';
    this.nextStep = 0;
    this.durableStep = null; // the last X-Spliteasy-Durable-Step heard
    this.onDurable = null; // called with each durable step heard
  }

  /** A new session; returns {sessionId, token, nextStep, durableStep}. */
  async open() {
    const s = await this.transport.openSession({
      manifestSha256: this.manifestSha256,
      auxLabel: this.auxLabel,
      codec: this.codec,
    });
    if ((s.codec ?? 'float32') !== this.codec) {
      throw new DeviceError(`the server opened the session with codec ${s.codec}, this run asked for ${this.codec}`);
    }
    this.useSession(s.sessionId);
    this.nextStep = s.nextStep;
    this.heard(s.durableStep);
    return s;
  }

  /** Continue a session this device opened before (a restarted device), at `nextStep`. */
  attach({ sessionId, token }, nextStep) {
    this.transport.attach({ sessionId, token });
    this.useSession(sessionId);
    this.nextStep = nextStep;
  }

  useSession(sessionId) {
    this.sessionId = sessionId;
    this.session = sessionBytes(sessionId);
  }

  heard(durableStep) {
    if (durableStep === null || durableStep === undefined) return;
    this.durableStep = durableStep;
    this.onDurable?.(durableStep);
  }

  async close() {
    if (this.session) {
      await this.transport.closeSession();
      this.session = null;
    }
  }

  async call(t, op, frames) {
    let t0 = now();
    const body = encode(frames);
    t.codec_ms += now() - t0;
    const reply = await this.transport.exchange(op, body);
    this.heard(reply.durableStep);
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
    const codec = compressible(kindName(kind), spec.dtype ?? 'float32') ? this.codec : 'float32';
    return frame(kind, spec.name, data, shape, spec.layout, { session: this.session, step, dtype: spec.dtype, codec });
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

  /** device() for work that awaits reads (webgpu reads results back only asynchronously). */
  async deviceAsync(t, fn) {
    const t0 = now();
    const out = await fn();
    t.device_ms += now() - t0;
    return out;
  }

  /**
   * One training step on a batch: x a Float32Array (NHWC, C order) of shape `shape`,
   * y the labels (an Int32Array of class indices, or a Float32Array of rows for the other
   * losses: losses.mjs). Returns the metrics record.
   */
  async step(x, y, shape) {
    if (!this.session) await this.open();
    const m = this.manifest;
    const step = this.nextStep;
    const t = { device_ms: 0, server_ms: 0, codec_ms: 0, wire_ms: 0, total_ms: 0, bytes_up: 0, bytes_down: 0 };
    const start = now();
    const down = this.auxLabel ? FrameKind.TARGET : FrameKind.GRADIENT;
    const keep = [];
    // Dropout seeds are a function of the step, so a replayed step draws the same masks.
    if ('stepSeed' in this.rt) this.rt.stepSeed = step;
    try {
      const xT = tf.tensor(x, shape, this.manifest.input.dtype ?? 'float32'); // int32: token ids
      keep.push(xT);
      const a = this.device(t, () => this.rt.aForward(xT));
      keep.push(a);
      // data(), not dataSync(): the same values on cpu and webgl, and the only read webgpu has
      const aData = await this.deviceAsync(t, () => a.data());
      let reply;
      let loss;
      if (m.split_mode === 'double') {
        reply = await this.call(t, 'forward', [this.frameOf(FrameKind.ACTIVATION, m.cuts[0], aData, a.shape, step)]);
        const bf = this.expect(reply, FrameKind.ACTIVATION, m.cuts[1], step);
        const { gBData, lossValue } = await this.deviceAsync(t, async () => {
          const b = tf.tensor(bf.data, bf.shape, 'float32');
          const yT = labelsTensor(m, y);
          const { loss: l, lossTensor, gB } = this.rt.cTrain(b, yT);
          // auxiliary label: b_hat = b - dL/db
          const up = this.auxLabel ? tf.sub(b, gB) : gB;
          const data = await up.data();
          const lv = lossTensor ? (await lossTensor.data())[0] : l; // webgpu: read asynchronously
          tf.dispose([b, yT, gB, up, lossTensor ?? []]);
          return { gBData: data, lossValue: lv };
        });
        loss = lossValue;
        reply = await this.call(t, 'backward', [this.frameOf(down, m.cuts[1], gBData, bf.shape, step)]);
      } else {
        reply = await this.call(t, 'step', [
          this.frameOf(FrameKind.ACTIVATION, m.cuts[0], aData, a.shape, step),
          this.frameOf(FrameKind.LABELS, m.labels, labelsData(m, y), labelsShape(m, y), step),
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
      return { step, loss, ...t, codec: this.codec };
    } finally {
      tf.dispose(keep);
    }
  }

  /** The model's output for a batch (A and C here, B on the server in inference mode). */
  async predict(x, shape) {
    if (!this.session) await this.open();
    const m = this.manifest;
    const t = { device_ms: 0, server_ms: 0, codec_ms: 0, wire_ms: 0, bytes_up: 0, bytes_down: 0 };
    const xT = tf.tensor(x, shape, m.input.dtype ?? 'float32');
    const a = this.rt.aInfer(xT);
    const aData = await a.data(); // asynchronously: the one read every backend has
    const reply = await this.call(t, 'infer', [this.frameOf(FrameKind.ACTIVATION, m.cuts[0], aData, a.shape, this.nextStep)]);
    tf.dispose([xT, a]);
    const out = m.split_mode === 'double' ? m.cuts[1] : m.output;
    const f = this.expect(reply, FrameKind.ACTIVATION, out, this.nextStep);
    if (m.split_mode !== 'double') return { data: f.data, shape: f.shape };
    const b = tf.tensor(f.data, f.shape, 'float32');
    const y = this.rt.cInfer(b);
    const result = { data: (await y.data()).slice(), shape: y.shape };
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
 * Train the steps of `sched` (data.mjs schedule) from trainer.nextStep on, calling
 * onStep(record, batch) after each. With a RunState (state.mjs) every completed step is
 * snapshotted (and persisted by its store), and the loop agrees with the server on where to
 * resume: a 409 step_conflict naming an earlier step S (the server restarted from its
 * checkpoint) rolls A, C and their optimizers back to the snapshot of step S and replays
 * the batches from S in the same order; 409 stale_forward (the server revoked this step's
 * lease on B) redoes the step from its snapshot; a server that lost the session altogether (404
 * unknown_session) gets a new session, and the run starts again from step 0 and the bundle's
 * weights. onEvent({type, message, ...}) tells the caller about either.
 * Returns the records of the steps that count (a replayed step replaces its first record).
 */
export async function train(trainer, sched, { state = null, onStep = () => {}, onEvent = () => {}, shouldStop = () => false } = {}) {
  const records = [];
  if (state) trainer.onDurable = (d) => state.announce(d);
  let conflicts = 0;
  while (trainer.nextStep < sched.total) {
    if (shouldStop()) break;
    const batch = sched.at(trainer.nextStep);
    let rec;
    try {
      rec = await trainer.step(batch.x, batch.y, batch.shape);
    } catch (err) {
      if (state && err instanceof StepConflict && err.nextStep <= trainer.nextStep && conflicts < 3) {
        conflicts += 1;
        const from = trainer.nextStep;
        state.announce(err.durableStep);
        await rollBack(trainer, state, sched, err.nextStep);
        onEvent({
          type: 'rollback',
          from,
          to: err.nextStep,
          message: `server resumed this session at step ${err.nextStep} (its checkpoint): rolled back from step ${from}, replaying`,
        });
        while (records.length && records.at(-1).step >= err.nextStep) records.pop();
        continue;
      }
      if (state && err instanceof ProtocolError && err.code === 'stale_forward' && conflicts < 3) {
        // this device held B past the server's lease timeout and another device took it:
        // undo the half-done step (C was updated) and do it again
        conflicts += 1;
        const redo = trainer.nextStep;
        await rollBack(trainer, state, sched, redo);
        onEvent({ type: 'redo', message: `the server revoked step ${redo}'s hold on B (held too long): redoing it` });
        continue;
      }
      if (state && err instanceof ProtocolError && err.code === 'unknown_session' && conflicts < 3) {
        conflicts += 1;
        await newSession(trainer, state, sched);
        records.length = 0;
        onEvent({
          type: 'new-session',
          message: `server no longer knows this session: started session ${trainer.sessionId.slice(0, 8)} from step 0`,
        });
        continue;
      }
      throw err;
    }
    conflicts = 0;
    rec.epoch = batch.epoch;
    if (state) await state.commit(await takeSnapshot(trainer.rt, progressAt(sched, rec.step + 1, rec, state.run)));
    records.push(rec);
    await onStep(rec, batch);
  }
  return records;
}

/**
 * progress.json's fields for a snapshot after `step` completed steps (those of the Python
 * runtimes, device_tf/state.py, plus `done` and the step's loss). `run` is session.json's
 * "run" (the manifest hash, the shuffle).
 */
export function progressAt(sched, step, rec = null, run = null) {
  return {
    step,
    epoch: Math.floor(step / sched.perEpoch),
    position: step % sched.perEpoch,
    steps_per_epoch: sched.perEpoch,
    total_steps: sched.total,
    shuffle: run ? { seed: run.seed, n_samples: run.n_samples, rule: run.shuffle } : null,
    manifest_sha256: run?.manifest_sha256 ?? null,
    done: step >= sched.total,
    loss: rec ? rec.loss : null,
  };
}

/** Restore the snapshot of step `s` and continue from there (the server is at s). */
export async function rollBack(trainer, state, sched, s) {
  const snap = state.snapshotAt(s);
  if (!snap) {
    throw new DeviceError(
      `the server resumed session ${trainer.sessionId} at step ${s}, but this device holds snapshots of ` +
        `steps [${state.held().join(', ')}] only; start a new run`,
    );
  }
  restoreSnapshot(trainer.rt, snap);
  trainer.nextStep = s;
  await state.commit(snap);
}

/** A new session from step 0 (the server lost ours): the bundle's weights, a fresh start. */
export async function newSession(trainer, state, sched) {
  const s = await trainer.open();
  restoreSnapshot(trainer.rt, state.initial);
  trainer.nextStep = 0;
  state.durable = null;
  state.announce(s.durableStep);
  await state.saveSession({ ...state.session, session_id: s.sessionId, token: s.token });
  await state.commit(state.initial);
}

/**
 * Start the run, or resume the one the state holds. `server` is where this run trains, `run`
 * what must not change for a stored run to be resumed (session.json's "run": manifest and
 * data hashes, runtime, aux_label, batch size, epochs, step cap, shuffle seed).
 * session.json is {format_version, server, session_id, token, run, created}, as the Python
 * runtimes write it, plus `extra` (the page keeps its settings there). Returns {resumed: false} for a new run, else {resumed: true, from, at, done}: the stored
 * snapshot's step `from`, and the step `at` the run continues at (lower if the server was
 * found at its earlier checkpoint).
 */
export async function startRun(trainer, state, { server, run, extra = {} }, sched, { onEvent = () => {} } = {}) {
  state.run = run;
  state.initial = await takeSnapshot(trainer.rt, progressAt(sched, 0, null, run));
  const saved = await state.load();
  if (!saved.session) {
    const s = await trainer.open();
    state.announce(s.durableStep);
    const session = { format_version: 1, server, session_id: s.sessionId, token: s.token, run, ...extra };
    await state.saveSession({ ...session, created: new Date().toISOString() });
    await state.commit(state.initial);
    return { resumed: false };
  }
  const theirs = saved.session.run ?? {};
  const keys = [...new Set([...Object.keys(run), ...Object.keys(theirs)])];
  const diff = keys.filter((k) => JSON.stringify(theirs[k] ?? null) !== JSON.stringify(run[k] ?? null));
  if (diff.includes('manifest_sha256')) {
    throw new DeviceError(
      `the saved state belongs to another bundle (manifest ${String(theirs.manifest_sha256).slice(0, 12)}, ` +
        `this bundle's is ${run.manifest_sha256.slice(0, 12)}); use another state dir or remove it`,
    );
  }
  if (diff.length) {
    const show = (v) => (typeof v === 'string' && v.length > 24 ? `${v.slice(0, 12)}…` : JSON.stringify(v ?? null));
    const what = diff.filter((k) => k !== 'shuffle').map((k) => `${k} ${show(theirs[k])} -> ${show(run[k])}`);
    throw new DeviceError(
      `the saved state holds a run with other settings (${what.join('; ')}): resuming would train on other ` +
        'batches; use the same settings, another state dir, or remove it',
    );
  }
  state.session = saved.session;
  if (saved.session.server !== server) await state.saveSession({ ...saved.session, server }); // where it is now
  // durable/ is written before latest/: after a crash between the two it is the newer one
  const snap = [saved.latest, saved.durable].filter(Boolean).sort((a, b) => b.step - a.step)[0] ?? state.initial;
  restoreSnapshot(trainer.rt, snap);
  state.latest = snap;
  state.durable = saved.durable;
  trainer.attach({ sessionId: saved.session.session_id, token: saved.session.token }, snap.step);
  if (snap.progress.done) return { resumed: true, from: snap.step, at: snap.step, done: true };
  let info = null;
  try {
    info = await trainer.transport.sessionInfo();
  } catch (err) {
    if (err instanceof ProtocolError && err.code === 'unknown_session') {
      await newSession(trainer, state, sched);
      onEvent({ type: 'new-session', message: `the server no longer knows session ${saved.session.session_id.slice(0, 8)}: started a new one from step 0` });
      return { resumed: true, from: snap.step, at: 0, done: false };
    }
    // an older server without GET /v1/sessions/{sid}: a 409 in the loop will tell
    const oldServer = err instanceof ProtocolError && (err.status === 404 || err.status === 405);
    if (!oldServer) throw err;
  }
  if (info) {
    state.announce(info.durableStep);
    if (info.nextStep < snap.step) {
      await rollBack(trainer, state, sched, info.nextStep);
      onEvent({
        type: 'rollback',
        from: snap.step,
        to: info.nextStep,
        message: `server holds this session at step ${info.nextStep} (its checkpoint): rolled back from step ${snap.step}`,
      });
    } else if (info.nextStep > snap.step + 1) {
      throw new DeviceError(
        `the server is at step ${info.nextStep} of session ${saved.session.session_id}, this device's state at ${snap.step}: ` +
          'the state dir is older than the run; start a new run',
      );
    }
  }
  return { resumed: true, from: snap.step, at: trainer.nextStep, done: false };
}
