import assert from 'node:assert/strict';
import { mkdtemp, readFile, readdir, rename, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';

import * as tf from '@tensorflow/tfjs';

import { initBackend } from '../src/backend.mjs';
import { decodeSafetensors } from '../src/safetensors.mjs';
import { TfjsSlices } from '../src/slices.mjs';
import { RunState, readSnapshot, restoreSnapshot, takeSnapshot } from '../src/state.mjs';
import { FileStateStore } from '../src/state_fs.mjs';

await initBackend();

const manifest = (opt) => ({
  split_mode: 'double',
  num_classes: 3,
  loss: { from_logits: true },
  optimizer: opt,
});

/** Tiny A (dense + BN) and C (dense) with fixed initial weights. */
function slices(opt) {
  const init = (seed) => tf.initializers.randomUniform({ minval: -0.5, maxval: 0.5, seed });
  const xa = tf.input({ shape: [4] });
  const ha = tf.layers.dense({ units: 5, name: 'a_dense', kernelInitializer: init(1) }).apply(xa);
  const a = tf.model({ inputs: xa, outputs: tf.layers.batchNormalization({ name: 'a_bn' }).apply(ha) });
  const xc = tf.input({ shape: [5] });
  const c = tf.model({
    inputs: xc,
    outputs: tf.layers.dense({ units: 3, name: 'c_logits', kernelInitializer: init(2) }).apply(xc),
  });
  return new TfjsSlices(manifest(opt), { A: a, C: c });
}

function step(rt, i) {
  tf.tidy(() => {
    const x = tf.randomNormal([6, 4], 0, 1, 'float32', 10 + i);
    const y = tf.tensor1d([0, 1, 2, 0, 1, 2], 'int32');
    const a = rt.aForward(x);
    const { gB } = rt.cTrain(a, y);
    rt.aBackward(gB);
  });
}

const flat = (rt) => {
  const out = {};
  for (const [s, ws] of Object.entries(rt.weights())) for (const [k, w] of Object.entries(ws)) out[`${s}/${k}`] = Array.from(w.data);
  return out;
};

for (const opt of [
  { name: 'adam', learning_rate: 0.05 },
  { name: 'sgd', learning_rate: 0.1, momentum: 0.9 },
]) {
  test(`a snapshot restores variables, ${opt.name} slots and iterations exactly`, async () => {
    const rt = slices(opt);
    step(rt, 0);
    step(rt, 1);
    const snap = await takeSnapshot(rt, { step: 2, epoch: 0, position: 2 });
    const names = [...decodeSafetensors(snap.files.get('optimizer.safetensors')).tensors.keys()].sort();
    const slot = opt.name === 'adam' ? ['m', 'v'] : ['momentum'];
    const want = ['A', 'C']
      .flatMap((s) => [`${s}/iterations`, ...rt.trainables(s === 'A' ? rt.a : rt.c).flatMap(([n]) => slot.map((k) => `${s}/${n}/${k}`))])
      .sort();
    assert.deepEqual(names, want);
    const atTwo = flat(rt);
    step(rt, 2);
    step(rt, 3);
    const atFour = flat(rt);
    assert.notDeepEqual(atFour, atTwo);
    // Back to step 2 and the same two steps again: the very same numbers.
    restoreSnapshot(rt, await readSnapshot(snap.files, 'mem'));
    assert.deepEqual(flat(rt), atTwo);
    assert.equal(rt.optA.iterations, 2);
    step(rt, 2);
    step(rt, 3);
    assert.deepEqual(flat(rt), atFour);
    // Back to the start (no slots yet): a fresh optimizer.
    const fresh = slices(opt);
    const initial = await takeSnapshot(fresh, { step: 0, epoch: 0, position: 0 });
    restoreSnapshot(rt, initial);
    assert.deepEqual(flat(rt), flat(fresh));
    assert.equal(rt.optC.iterations, 0);
    assert.equal(rt.optC.slots.size, 0);
  });
}

test('a corrupt snapshot is refused, naming the file', async () => {
  const rt = slices({ name: 'sgd', learning_rate: 0.1 });
  const snap = await takeSnapshot(rt, { step: 0, epoch: 0, position: 0 });
  const bad = new Map(snap.files);
  const bytes = bad.get('slices.safetensors').slice();
  bytes[bytes.length - 1] ^= 1;
  bad.set('slices.safetensors', bytes);
  await assert.rejects(readSnapshot(bad, 'x'), /x: slices.safetensors does not match its sha256/);
  const torn = new Map(snap.files);
  torn.delete('checksums.json');
  await assert.rejects(readSnapshot(torn, 'x'), /no checksums.json \(torn write\)/);
});

test('the state dir: atomic folders, 0600 files, the aside copy after a crash, durable before latest', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'spliteasy-js-state-'));
  try {
    const warnings = [];
    const store = new FileStateStore(dir, { warn: (m) => warnings.push(m) });
    const state = new RunState(store);
    const rt = slices({ name: 'adam', learning_rate: 0.05 });
    state.announce(0);
    await state.commit(await takeSnapshot(rt, { step: 0, epoch: 0, position: 0 }));
    step(rt, 0);
    await state.commit(await takeSnapshot(rt, { step: 1, epoch: 0, position: 1 }));
    state.announce(1); // the server's checkpoint now holds step 1 = latest: promoted at the next commit
    step(rt, 1);
    await state.commit(await takeSnapshot(rt, { step: 2, epoch: 0, position: 2 }));
    await state.saveSession({ session_id: 'ab', token: 'secret' });
    assert.deepEqual((await readdir(dir)).sort(), ['durable', 'latest', 'session.json']);
    assert.equal((await stat(join(dir, 'session.json'))).mode & 0o777, 0o600);
    assert.equal((await stat(join(dir, 'latest', 'slices.safetensors'))).mode & 0o777, 0o600);
    const loaded = await new RunState(store).load();
    assert.equal(loaded.latest.step, 2);
    assert.equal(loaded.durable.step, 1);
    assert.equal(loaded.session.token, 'secret');
    const checksums = JSON.parse(await readFile(join(dir, 'latest', 'checksums.json'), 'utf8'));
    assert.equal(checksums.algorithm, 'sha256');
    assert.deepEqual(Object.keys(checksums.files), ['optimizer.safetensors', 'progress.json', 'slices.safetensors']);

    // A crash between "old aside" and "new in place": only .old-latest-* is there.
    await rename(join(dir, 'latest'), join(dir, '.old-latest-123'));
    assert.equal((await new RunState(store).load()).latest.step, 2);
    await rename(join(dir, '.old-latest-123'), join(dir, 'latest'));
    // A corrupt latest/ with no aside copy: skipped with a warning, never loaded.
    await writeFile(join(dir, 'latest', 'progress.json'), '{"step": 99}');
    assert.equal((await new RunState(store).load()).latest, null);
    assert.ok(warnings.some((w) => /progress.json does not match its sha256/.test(w)), warnings);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('the state dir lock: held by a live process -> refused; left by a dead one -> taken over', async () => {
  const { hostname } = await import('node:os');
  const dir = await mkdtemp(join(tmpdir(), 'spliteasy-js-lock-'));
  try {
    const store = new FileStateStore(dir);
    await writeFile(join(dir, '.lock'), JSON.stringify({ pid: process.ppid, host: hostname() }));
    await assert.rejects(store.lock(), /in use by another running device \(pid \d+\)/);
    await writeFile(join(dir, '.lock'), JSON.stringify({ pid: 2 ** 22 + 12345, host: hostname() }));
    await store.lock();
    assert.equal(JSON.parse(await readFile(join(dir, '.lock'), 'utf8')).pid, process.pid);
    await store.unlock();
    await writeFile(join(dir, '.lock'), ''); // a Python device's flock file
    await store.lock();
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});
