/**
 * The browser device: the page at /device/web/ trains A and C against the server that
 * served it, with the same modules as the Node CLI (slices, loop, codec, transport).
 *
 * Query parameters (all optional):
 *   data=URL    training data, a spliteasy frames file with x and y (default: the server's
 *               /v1/demo/digits.frames, scikit-learn's digits fitted to the bundle's input)
 *   schema=URL  the manifest JSON Schema (default /v1/schema)
 *   server=URL  the spliteasy server (default: this page's origin)
 *   batch=B epochs=E steps=N seed=S   as the CLI's --batch-size --epochs --steps --seed
 *   aux=1       auxiliary-label form of the backward messages
 *   auto=1      start training on load
 * Progress and loss are shown in the page; window.spliteasyResult holds
 * {status: "idle"|"loading"|"running"|"done"|"error"|"stopped", losses, records, error,
 *  resumedAt, step, weights (A's and C's variables once done)} for automation.
 *
 * The run survives a reload: after every step the page keeps A, C, their optimizer state,
 * the position in the data and its session (id, token) in IndexedDB (state_idb.mjs, the
 * same files as the Node state dir). Loading the page with an unfinished run saved resumes
 * it at the step it had reached, with the settings it was started with, and says so
 * ("resumed at step N"); "Start over" forgets it and ends its server session. A server
 * restarted from its checkpoint is followed as in Node (rollback to its step, replay).
 */

import { initBackend } from './backend.mjs';
import { fetchDeviceModels, fetchManifest } from './bundle_http.mjs';
import { parseData, schedule } from './data.mjs';
import { sha256Hex } from './digest.mjs';
import { DeviceError } from './errors.mjs';
import { SplitTrainer, startRun, train } from './loop.mjs';
import { SHUFFLE_RULE, shuffled } from './shuffle.mjs';
import { TfjsSlices } from './slices.mjs';
import { RunState } from './state.mjs';
import { IdbStateStore } from './state_idb.mjs';
import { HttpTransport, describeWait } from './transport.mjs';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const result = { status: 'idle', losses: [], records: [], error: null, resumedAt: null, step: 0 };
window.spliteasyResult = result;

const settings = {
  data: params.get('data') ?? `${params.get('server') ?? ''}/v1/demo/digits.frames`,
  schema: params.get('schema') ?? `${params.get('server') ?? ''}/v1/schema`,
  server: params.get('server') ?? '',
  batch: Number(params.get('batch') ?? 32),
  epochs: Number(params.get('epochs') ?? 1),
  steps: params.has('steps') ? Number(params.get('steps')) : undefined,
  seed: params.has('seed') ? Number(params.get('seed')) : undefined,
  aux: params.get('aux') === '1',
};
showSettings(settings);

function showSettings(st) {
  $('data').value = st.data;
  $('batch').value = st.batch;
  $('epochs').value = st.epochs;
  $('steps').value = st.steps ?? '';
  $('seed').value = st.seed ?? '';
}

// One saved run per server in this browser profile.
const store = new IdbStateStore(`run:${new URL(settings.server || location.origin, location.href).origin}`);
let storeWorks = true; // false where IndexedDB is unavailable (some private windows)
let stopRequested = false;
let running = null; // the promise of the current run

function setStatus(text, error = false) {
  $('status').textContent = text;
  $('status').className = error ? 'error' : '';
}

async function fetchBytes(url, what) {
  let r;
  try {
    r = await fetch(url);
  } catch (err) {
    throw new DeviceError(`cannot fetch ${what} from ${url}: ${err.message}`);
  }
  if (!r.ok) throw new DeviceError(`cannot fetch ${what} from ${url}: HTTP ${r.status}`);
  return new Uint8Array(await r.arrayBuffer());
}

function drawChart(losses) {
  const canvas = $('chart');
  const ctx = canvas.getContext('2d');
  const { width: w, height: h } = canvas;
  ctx.clearRect(0, 0, w, h);
  if (!losses.length) return;
  const pad = 24;
  const max = Math.max(...losses);
  const min = Math.min(0, ...losses);
  const x = (i) => pad + ((w - 2 * pad) * i) / Math.max(losses.length - 1, 1);
  const y = (v) => h - pad - ((h - 2 * pad) * (v - min)) / Math.max(max - min, 1e-9);
  ctx.strokeStyle = '#ccc';
  ctx.strokeRect(pad, pad, w - 2 * pad, h - 2 * pad);
  ctx.fillStyle = '#666';
  ctx.font = '11px system-ui';
  ctx.fillText(max.toFixed(3), 2, pad - 6);
  ctx.fillText(min.toFixed(3), 2, h - 6);
  ctx.strokeStyle = '#1565c0';
  ctx.lineWidth = 2;
  ctx.beginPath();
  losses.forEach((v, i) => (i ? ctx.lineTo(x(i), y(v)) : ctx.moveTo(x(i), y(v))));
  ctx.stroke();
}

function showStep(r, done, total, records) {
  const mean = (k) => (records.reduce((s, q) => s + q[k], 0) / records.length).toFixed(1);
  $('progress').value = done / total;
  $('loss').textContent = r.loss.toFixed(4);
  $('step').textContent = done;
  $('step-ms').textContent = mean('total_ms');
  $('device-ms').textContent = mean('device_ms');
  $('server-ms').textContent = mean('server_ms');
  $('wire-ms').textContent = mean('wire_ms');
  $('codec-ms').textContent = mean('codec_ms');
  const row = document.createElement('tr');
  const ms = [r.device_ms, r.server_ms, r.codec_ms, r.wire_ms, r.total_ms].map((v) => v.toFixed(1));
  const cells = [done, r.epoch + 1, r.loss.toFixed(4), ...ms];
  row.innerHTML = cells.map((c) => `<td>${c}</td>`).join('');
  $('log').prepend(row);
  drawChart(result.losses);
}

/**
 * Train: a new run from the form, or (`saved`: the stored session record) the saved run
 * resumed with the settings it was started with.
 */
async function run(saved = null) {
  const form = new FormData($('controls'));
  const st = saved?.page ?? {
    data: String(form.get('data')),
    batch: Number(form.get('batch')),
    epochs: Number(form.get('epochs')) || 1,
    steps: form.get('steps') ? Number(form.get('steps')) : null,
    seed: form.get('seed') !== '' && form.get('seed') !== null ? Number(form.get('seed')) : null,
    aux: settings.aux,
  };
  showSettings(st);
  const plan = { batchSize: st.batch, epochs: st.epochs, steps: st.steps ?? Infinity };
  if (st.seed !== null) plan.order = (d, epoch) => shuffled(d, st.seed, epoch);
  $('start').disabled = true;
  $('restart').hidden = false;
  stopRequested = false;
  Object.assign(result, { status: 'loading', losses: [], records: [], error: null, resumedAt: null, step: 0 });
  $('log').replaceChildren();
  drawChart([]);
  let trainer = null;
  let finished = false;
  try {
    if (!saved && storeWorks) await store.clear(); // a new run replaces whatever was saved
    setStatus('loading TF.js, the manifest and slices A/C…');
    await initBackend();
    let waiting = false;
    const transport = new HttpTransport(settings.server || location.origin, {
      onWait: (w) => {
        waiting = true;
        setStatus(describeWait(w), true);
      },
    });
    const schema = JSON.parse(new TextDecoder().decode(await fetchBytes(settings.schema, 'the manifest schema')));
    const { manifest, digest } = await fetchManifest(transport, schema);
    $('model').textContent =
      `${manifest.model}, ${manifest.split_mode} split at ${manifest.cuts.map((c) => c.name).join(' | ')}; ` +
      `${manifest.optimizer.name} lr ${manifest.optimizer.learning_rate}`;
    const models = await fetchDeviceModels(transport, manifest);
    const dataBytes = await fetchBytes(st.data, 'the training data');
    const data = parseData(dataBytes, manifest.input);
    const rt = new TfjsSlices(manifest, models);
    trainer = new SplitTrainer(rt, transport, manifest, digest, { auxLabel: st.aux });
    const sched = schedule(data, plan);
    const total = sched.total;
    $('total').textContent = total;
    const state = new RunState(storeWorks ? store : null);
    const runSpec = {
      manifest_sha256: digest,
      runtime: 'tfjs',
      aux_label: st.aux,
      data_sha256: await sha256Hex(dataBytes),
      n_samples: data.count,
      epochs: st.epochs,
      batch_size: st.batch,
      steps: st.steps,
      seed: st.seed,
      shuffle: st.seed === null ? 'file order' : SHUFFLE_RULE,
    };
    const onEvent = (e) => {
      console.warn(e.message);
      setStatus(e.message);
    };
    const start = await startRun(trainer, state, { server: transport.baseUrl, run: runSpec, extra: { page: st } }, sched, {
      onEvent,
    });
    if (start.resumed) {
      result.resumedAt = start.at;
      $('resume').hidden = false;
      $('resume').textContent =
        `resumed at step ${start.at} of ${total} from this browser's saved run ` +
        `(session ${trainer.sessionId.slice(0, 8)}…${start.at !== start.from ? `; saved at step ${start.from}, the server's checkpoint is at ${start.at}` : ''})`;
      $('step').textContent = start.at;
      $('progress').value = start.at / total;
    }
    result.step = trainer.nextStep;
    result.status = 'running';
    const training = `training: ${data.count} samples, ${total} steps of ${st.batch}`;
    setStatus(training);
    const records = await train(trainer, sched, {
      state,
      onEvent,
      shouldStop: () => stopRequested,
      onStep: async (r) => {
        result.step = r.step + 1;
        result.losses.push(r.loss);
        result.records.push(r);
        showStep(r, r.step + 1, total, result.records);
        if (waiting) setStatus(training); // the server is back
        waiting = false;
        await new Promise((resolve) => setTimeout(resolve, 0)); // let the page repaint
      },
    });
    if (stopRequested) {
      result.status = 'stopped';
      return;
    }
    finished = true;
    const first = records[0]?.loss;
    const last = records.at(-1)?.loss;
    setStatus(
      `done: ${total} steps` + (records.length ? `, loss ${first.toFixed(4)} → ${last.toFixed(4)}` : '') +
        (start.resumed ? ` (resumed at step ${start.at})` : ''),
    );
    // A's and C's final variables (weights() of the Node CLI's --weights-out), so a test can
    // compare what the page trained with unsplit Keras, not only its losses.
    result.weights = Object.fromEntries(
      Object.entries(rt.weights()).map(([part, vars]) => [
        part,
        Object.fromEntries(Object.entries(vars).map(([k, w]) => [k, { shape: w.shape, data: Array.from(w.data) }])),
      ]),
    );
    result.status = 'done';
  } catch (err) {
    console.error(err);
    result.error = `${err.name}: ${err.message}`;
    result.status = 'error';
    setStatus(`error: ${err.message}`, true);
  } finally {
    // a finished run ends its session and forgets its state; an interrupted one keeps both
    if (finished) {
      await trainer?.close();
      if (storeWorks) await store.clear();
      $('restart').hidden = true;
    }
    $('start').disabled = false;
  }
}

/** Forget the saved run: stop training, end its server session, clear IndexedDB. */
async function startOver() {
  stopRequested = true;
  $('restart').disabled = true;
  try {
    await running;
    const saved = storeWorks ? await store.readSession() : null;
    if (saved?.session_id) {
      const t = new HttpTransport(saved.server ?? (settings.server || location.origin));
      t.attach({ sessionId: saved.session_id, token: saved.token });
      await t.closeSession();
    }
    if (storeWorks) await store.clear();
    Object.assign(result, { status: 'idle', resumedAt: null });
    $('resume').hidden = true;
    $('restart').hidden = true;
    setStatus('the saved run is forgotten: press Train to start a new one');
  } finally {
    $('restart').disabled = false;
  }
}

$('controls').addEventListener('submit', (ev) => {
  ev.preventDefault();
  running = run();
});
$('restart').addEventListener('click', () => startOver());
$('model').textContent = 'ready';

// An unfinished run saved in this browser resumes on load; otherwise auto=1 starts one.
(async () => {
  let saved = null;
  try {
    saved = await store.readSession();
  } catch (err) {
    storeWorks = false;
    console.warn(`IndexedDB unavailable, runs will not survive a reload: ${err.message}`);
  }
  if (saved?.page) running = run(saved);
  else if (params.get('auto') === '1') running = run();
})();
