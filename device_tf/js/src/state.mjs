/**
 * What the device keeps so that no committed step is lost (issue #7), in Node and in a page.
 *
 * A *snapshot* is the device's whole training state after a completed step, as the files of
 * the contract in /docs (the same names and bytes whether they land in a folder or in
 * IndexedDB):
 *
 *   slices.safetensors     every variable of A and C, "A/<layer>/<var>", "C/<layer>/<var>"
 *                          (the names of DeviceRuntime.weights() / keras_util.named_variables)
 *   optimizer.safetensors  slots "A/<layer>/<var>/<slot>" (m, v for Adam; momentum for SGD
 *                          with momentum) and the iteration counts "A/iterations" (int64 []):
 *                          the names the Python runtimes use (device_tf/runtime.py RuntimeState)
 *   progress.json          {step, epoch, position, ...}: `step` steps are done, the next batch
 *                          is number `position` of epoch `epoch` (batches are a pure function
 *                          of (seed, epoch, position), so the run resumes at the exact batch)
 *   checksums.json         {"algorithm": "sha256", "files": {name: hex}} (shared_schema/durable.py)
 *
 * RunState keeps three snapshots in memory -- `initial` (the bundle's weights, step 0),
 * `latest` (after the last completed step) and `durable` (at the step the server's newest
 * checkpoint holds for this session, X-Spliteasy-Durable-Step) -- and hands latest/ and
 * durable/ to a store (state_fs.mjs: a state dir; state_idb.mjs: IndexedDB) to persist.
 * After a server restart (409 step_conflict, next_step S) the loop rolls back to the
 * snapshot of step S and replays; after a device restart it continues from latest/.
 */

import { sha256Hex } from './digest.mjs';
import { DeviceError } from './errors.mjs';
import { decodeSafetensors, encodeSafetensors } from './safetensors.mjs';

export const FORMAT_VERSION = 1;
export const SNAPSHOT_FILES = ['optimizer.safetensors', 'progress.json', 'slices.safetensors'];
const CHECKSUMS = 'checksums.json';

const utf8 = (s) => new TextEncoder().encode(s);
const text = (b) => new TextDecoder().decode(b);

/** JSON the way Python's json.dumps(obj, indent=1, sort_keys=True) writes it. */
export function sortedJson(obj) {
  const sort = (v) => {
    if (Array.isArray(v)) return v.map(sort);
    if (v && typeof v === 'object') return Object.fromEntries(Object.keys(v).sort().map((k) => [k, sort(v[k])]));
    return v;
  };
  return JSON.stringify(sort(obj), null, 1);
}

/** checksums.json for `files` (Map name -> bytes). */
export async function checksumsOf(files) {
  const sums = {};
  for (const name of [...files.keys()].sort()) if (name !== CHECKSUMS) sums[name] = await sha256Hex(files.get(name));
  return utf8(sortedJson({ algorithm: 'sha256', files: sums }));
}

/** Throws DeviceError unless `files` holds a checksums.json that matches every file it lists. */
export async function verifyFiles(files, where) {
  const raw = files.get(CHECKSUMS);
  if (!raw) throw new DeviceError(`${where}: no ${CHECKSUMS} (torn write)`);
  let sums;
  try {
    const doc = JSON.parse(text(raw));
    sums = doc.files;
    if (!sums || typeof sums !== 'object' || (doc.algorithm ?? 'sha256') !== 'sha256') throw new Error('layout');
  } catch (err) {
    throw new DeviceError(`${where}: unreadable ${CHECKSUMS} (${err.message})`);
  }
  for (const [name, want] of Object.entries(sums)) {
    const data = files.get(name);
    if (!data) throw new DeviceError(`${where}: ${name} is missing`);
    if ((await sha256Hex(data)) !== want) throw new DeviceError(`${where}: ${name} does not match its sha256 (corrupt)`);
  }
  for (const name of SNAPSHOT_FILES) if (!(name in sums)) throw new DeviceError(`${where}: ${name} is not listed`);
}

/**
 * A snapshot of the runtime (slices.mjs TfjsSlices) after `progress.step` completed steps.
 * Returns {step, progress, files: Map name -> Uint8Array}.
 */
export async function takeSnapshot(rt, progress) {
  await rt.prefetch?.(); // webgpu: download the variables first (exportState reads synchronously)
  const st = rt.exportState();
  const vars = new Map();
  for (const [slice, ws] of Object.entries(st.weights)) {
    for (const [name, w] of Object.entries(ws)) vars.set(`${slice}/${name}`, { shape: w.shape, data: w.data });
  }
  const opt = new Map();
  const iterations = {};
  for (const [slice, o] of Object.entries(st.optimizers)) {
    iterations[slice] = o.iterations;
    opt.set(`${slice}/iterations`, { shape: [], data: BigInt64Array.from([BigInt(o.iterations)]) });
    for (const [name, t] of o.slots) opt.set(`${slice}/${name}`, t);
  }
  const full = { format_version: FORMAT_VERSION, runtime: 'tfjs', ...progress, iterations, dropout_seed: st.stepSeed };
  const meta = { format: 'spliteasy-device-state', runtime: 'tfjs', step: String(progress.step) };
  const files = new Map([
    ['slices.safetensors', encodeSafetensors(vars, meta)],
    ['optimizer.safetensors', encodeSafetensors(opt, meta)],
    ['progress.json', utf8(sortedJson(full))],
  ]);
  files.set(CHECKSUMS, await checksumsOf(files));
  return { step: progress.step, progress: full, files };
}

/** A snapshot from its files (verified); throws DeviceError naming what is wrong. */
export async function readSnapshot(files, where) {
  await verifyFiles(files, where);
  let progress;
  try {
    progress = JSON.parse(text(files.get('progress.json')));
  } catch (err) {
    throw new DeviceError(`${where}: progress.json is not JSON (${err.message})`);
  }
  if (progress.format_version !== FORMAT_VERSION || !Number.isInteger(progress.step)) {
    throw new DeviceError(`${where}: progress.json of format ${progress.format_version}, not ${FORMAT_VERSION}`);
  }
  return { step: progress.step, progress, files };
}

/** Put a snapshot's state into the runtime. */
export function restoreSnapshot(rt, snap, where = `snapshot of step ${snap.step}`) {
  const vars = decodeSafetensors(snap.files.get('slices.safetensors'), `${where}/slices.safetensors`).tensors;
  const opt = decodeSafetensors(snap.files.get('optimizer.safetensors'), `${where}/optimizer.safetensors`).tensors;
  const weights = {};
  for (const [key, t] of vars) {
    const cut = key.indexOf('/');
    const slice = key.slice(0, cut);
    (weights[slice] ??= {})[key.slice(cut + 1)] = t;
  }
  const optimizers = {};
  for (const [key, t] of opt) {
    const cut = key.indexOf('/');
    const slice = key.slice(0, cut);
    const o = (optimizers[slice] ??= { iterations: 0, slots: new Map() });
    if (key.slice(cut + 1) === 'iterations') o.iterations = Number(t.data[0]);
    else o.slots.set(key.slice(cut + 1), t);
  }
  rt.importState({ weights, optimizers, stepSeed: snap.progress.dropout_seed ?? snap.step });
}

/**
 * The device's snapshots and the agreement with the server on where to resume.
 * `store` persists (null: memory only -- still enough to survive a server restart).
 */
export class RunState {
  constructor(store = null, { log = () => {} } = {}) {
    this.store = store;
    this.log = log;
    this.session = null; // session.json
    this.run = null; // its "run": what a resumed run must share with the stored one
    this.initial = null;
    this.latest = null;
    this.durable = null;
    this.announced = null; // the last X-Spliteasy-Durable-Step heard
  }

  /** What the store holds: {session, latest, durable} (snapshots verified; a corrupt one is null). */
  async load() {
    if (!this.store) return { session: null, latest: null, durable: null };
    const session = await this.store.readSession();
    const snaps = {};
    for (const name of ['latest', 'durable']) {
      snaps[name] = await this.store.readSnapshot(name, (files, where) => readSnapshot(files, where));
    }
    return { session, ...snaps };
  }

  /** session.json: server, session id and token, hashes and plan of the run. */
  async saveSession(session) {
    this.session = session;
    if (this.store) await this.store.writeSession(session);
  }

  /** The server announced durable step D (from a reply header or a session's JSON). */
  announce(d) {
    if (Number.isInteger(d)) this.announced = d;
  }

  /**
   * Record the snapshot after a completed step (or the starting one): the one of the
   * announced durable step becomes durable/ (persisted before latest/, so a crash between
   * the two leaves durable/ ahead, which load() accounts for).
   */
  async commit(snap) {
    const d = this.announced;
    const promote = [];
    if (d !== null && this.latest?.step === d && this.durable?.step !== d) promote.push(this.latest);
    if (d !== null && snap.step === d) promote.push(snap);
    for (const s of promote) {
      this.durable = s;
      if (this.store) await this.store.writeSnapshot('durable', s.files);
    }
    this.latest = snap;
    if (this.store) await this.store.writeSnapshot('latest', snap.files);
  }

  /** The snapshot of step `s` the device holds (durable, latest or initial), else null. */
  snapshotAt(s) {
    for (const snap of [this.durable, this.latest, this.initial]) if (snap?.step === s) return snap;
    return null;
  }

  /** Steps the device holds snapshots of (for messages). */
  held() {
    return [...new Set([this.initial, this.durable, this.latest].filter(Boolean).map((s) => s.step))].sort((a, b) => a - b);
  }

  async clear() {
    this.session = null;
    this.latest = null;
    this.durable = null;
    this.announced = null;
    if (this.store) await this.store.clear();
  }
}
