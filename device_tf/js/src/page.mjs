/**
 * The browser device: the page at /device/web/ trains A and C against the server that
 * served it, with the same modules as the Node CLI (slices, loop, codec, transport).
 * The training runs in a module worker (page_worker.mjs, started through worker_boot.mjs),
 * so the page stays responsive while a step computes; this module is the page's UI.
 *
 * Query parameters (all optional):
 *   data=URL    training data, a spliteasy frames file with x and y (default: the server's
 *               /v1/demo/digits.frames, scikit-learn's digits fitted to the bundle's input).
 *               Or the user's own images, picked in the form: a folder of class subfolders
 *               or several <class>_*.png files, decoded in this page (page_data.mjs); a
 *               saved run on picked images resumes once the same images are picked again.
 *   schema=URL  the manifest JSON Schema (default /v1/schema)
 *   server=URL  the spliteasy server (default: this page's origin)
 *   batch=B epochs=E steps=N seed=S   as the CLI's --batch-size --epochs --steps --seed
 *   backend=cpu|webgl|webgpu          TF.js backend (default cpu: the Node device's numbers)
 *   f16=1       accept a float16-only GPU (otherwise webgl there falls back to cpu)
 *   transport=http|ws   how frames travel: a request per message, or one WebSocket (the
 *               browser's native one; the token rides as its `bearer.<token>` subprotocol)
 *               for the whole run (default http). Against `spliteasy serve --mode parallel`
 *               the page averages A and C with the round's other devices every
 *               sync_every rounds (parallel.mjs), as the Node device does.
 *   simulate=float16   pretend this GPU cannot render float32 textures (tests, previews)
 *   aux=1       auxiliary-label form of the backward messages
 *   codec=NAME  wire codec of activations and gradients (codec.mjs: float32 default, fp16,
 *               bf16, int8, int8-channel, int4), asked for when the session opens
 *   auto=1      start training on load
 * Progress and loss are shown in the page; window.spliteasyResult holds
 * {status: "idle"|"loading"|"running"|"done"|"error"|"stopped", losses, records, error,
 *  resumedAt, step, backend ({name, requested, note, float32, drift, refused}),
 *  transport ({kind, connections}), parallel (the server's parallel settings, or null),
 *  syncs (A/C averagings done),
 *  ui ({ticks, maxGapMs}: the page's own timer, to show it was never blocked),
 *  weights (A's and C's variables once done), data ({source, classes, count} of picked
 *  images)} for automation.
 *
 * The run survives a reload: after every step the worker keeps A, C, their optimizer state,
 * the position in the data and its session (id, token) in IndexedDB (state_idb.mjs, the
 * same files as the Node state dir). Loading the page with an unfinished run saved resumes
 * it at the step it had reached, with the settings it was started with (backend included),
 * and says so ("resumed at step N"); "Start over" forgets it and ends its server session.
 * A server restarted from its checkpoint is followed as in Node (rollback to its step, replay).
 */

import { IdbStateStore } from './state_idb.mjs';
import { HttpTransport } from './transport.mjs';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const result = {
  status: 'idle',
  losses: [],
  records: [],
  error: null,
  resumedAt: null,
  step: 0,
  backend: null,
  transport: null,
  parallel: null,
  syncs: 0,
  ui: { ticks: 0, maxGapMs: 0 },
};
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
  codec: params.get('codec') ?? 'float32',
  backend: params.get('backend') ?? 'cpu',
  f16: params.get('f16') === '1',
  key: params.get('key'), // enrolment key for a server started with --auth-keys
  transport: params.get('transport') === 'ws' ? 'ws' : 'http',
};
const simulateFloat16 = params.get('simulate') === 'float16';
showSettings(settings);

function showSettings(st) {
  $('data').value = st.data;
  $('batch').value = st.batch;
  $('epochs').value = st.epochs;
  $('steps').value = st.steps ?? '';
  $('seed').value = st.seed ?? '';
  $('backend').value = st.backend ?? 'cpu';
  $('f16').checked = Boolean(st.f16);
  $('transport').value = st.transport ?? 'http';
}

// One saved run per server in this browser profile.
const serverOrigin = new URL(settings.server || location.origin, location.href).origin;
const store = new IdbStateStore(`run:${serverOrigin}`);
let storeWorks = true; // false where IndexedDB is unavailable (some private windows)
let running = null; // the promise of the current run (resolves when the worker has ended it)
let worker = null;

function setStatus(text, error = false) {
  $('status').textContent = text;
  $('status').className = error ? 'error' : '';
}

// The page's own clock: a timer that stalls while anything blocks the main thread. Training
// runs in the worker, so it keeps ticking through every step (the browser test checks).
let lastTick = performance.now();
setInterval(() => {
  const t = performance.now();
  result.ui.ticks += 1;
  if (result.status === 'running') result.ui.maxGapMs = Math.max(result.ui.maxGapMs, t - lastTick);
  lastTick = t;
}, 10);

/** The training worker (started once; page_worker.mjs behind worker_boot.mjs's loader). */
function trainingWorker() {
  if (worker) return worker;
  worker = new Worker(new URL('./worker_boot.mjs', import.meta.url), { type: 'module', name: 'spliteasy-training' });
  // The worker cannot see this page's import map: hand it over, as absolute URLs.
  const map = JSON.parse(document.querySelector('script[type="importmap"]')?.textContent || '{}');
  const imports = Object.fromEntries(
    Object.entries(map.imports ?? {}).map(([name, url]) => [name, new URL(url, document.baseURI).href]),
  );
  worker.postMessage({ type: 'init', imports });
  return worker;
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
 * resumed with the settings it was started with. Resolves when the worker has ended it.
 */
function run(saved = null, local = null) {
  const form = new FormData($('controls'));
  const st = saved?.page ?? {
    data: local ? `local:${local.source}` : String(form.get('data')),
    batch: Number(form.get('batch')),
    epochs: Number(form.get('epochs')) || 1,
    steps: form.get('steps') ? Number(form.get('steps')) : null,
    seed: form.get('seed') !== '' && form.get('seed') !== null ? Number(form.get('seed')) : null,
    aux: settings.aux,
    codec: settings.codec,
    backend: $('backend').value || 'cpu', // even a disabled option: the worker says why it cannot
    f16: form.get('f16') === 'on',
    transport: form.get('transport') === 'ws' ? 'ws' : 'http',
  };
  showSettings(st);
  $('start').disabled = true;
  $('restart').hidden = false;
  Object.assign(result, {
    status: 'loading',
    losses: [],
    records: [],
    error: null,
    resumedAt: null,
    step: 0,
    backend: null,
    transport: null,
    parallel: null,
    syncs: 0,
    ui: { ticks: result.ui.ticks, maxGapMs: 0 },
  });
  delete result.weights;
  if (local) result.data = { source: local.source, classes: local.classes, count: local.count };
  $('log').replaceChildren();
  $('resume').hidden = true;
  drawChart([]);
  let total = 0;
  let stepStartTicks = result.ui.ticks;
  const w = trainingWorker();
  return new Promise((resolve) => {
    w.onmessage = ({ data: m }) => {
      switch (m.type) {
        case 'status':
          setStatus(m.text, m.error);
          break;
        case 'model':
          $('model').textContent = m.text;
          break;
        case 'backend': {
          const { type, gpu, ...info } = m;
          result.backend = info;
          $('backend-note').textContent = m.note;
          $('backend-note').className = m.refused ? 'error' : '';
          $('backend-used').textContent = m.name;
          break;
        }
        case 'server':
          result.transport = m.transport;
          result.parallel = m.parallel;
          $('server-mode').textContent = m.text;
          break;
        case 'synced':
          result.syncs = m.syncs;
          break;
        case 'total':
          total = m.total;
          $('total').textContent = total;
          break;
        case 'resumed':
          result.resumedAt = m.at;
          $('resume').hidden = false;
          $('resume').textContent = m.text;
          $('step').textContent = m.at;
          $('progress').value = m.at / total;
          break;
        case 'running':
          result.step = m.step;
          result.status = 'running';
          break;
        case 'stepStart':
          stepStartTicks = result.ui.ticks;
          break;
        case 'step': {
          const r = m.record;
          r.ui_ticks = result.ui.ticks - stepStartTicks; // page timer ticks while this step ran
          result.step = r.step + 1;
          result.losses.push(r.loss);
          result.records.push(r);
          showStep(r, r.step + 1, total, result.records);
          break;
        }
        case 'done':
          result.weights = m.weights;
          if (m.transport) result.transport = m.transport;
          setStatus(m.text);
          result.status = 'done';
          break;
        case 'stopped':
          result.status = 'stopped';
          break;
        case 'error':
          result.error = m.error;
          result.status = 'error';
          setStatus(m.text, true);
          break;
        case 'ended':
          if (m.finished) $('restart').hidden = true;
          $('start').disabled = false;
          if (result.status === 'loading' || result.status === 'running') result.status = 'stopped';
          resolve();
          break;
        default:
          console.warn(`unknown message from the training worker: ${m.type}`);
      }
    };
    w.onerror = (ev) => {
      result.error = `Error: ${ev.message}`;
      result.status = 'error';
      setStatus(`error: the training worker failed: ${ev.message}`, true);
      $('start').disabled = false;
      resolve();
    };
    w.postMessage({
      type: 'start',
      settings: st,
      resume: Boolean(saved),
      server: settings.server ? new URL(settings.server, location.href).href : location.origin,
      schema: new URL(settings.schema, location.href).href,
      simulateFloat16,
      key: settings.key, // enrolment key (not saved with the run)
      dataBytes: local?.bytes.buffer ?? null, // the picked images, decoded (page_data.mjs)
    }, local ? [local.bytes.buffer] : []);
  });
}

/** Forget the saved run: stop training, end its server session, clear IndexedDB. */
async function startOver() {
  worker?.postMessage({ type: 'stop' });
  $('restart').disabled = true;
  try {
    await running;
    const saved = storeWorks ? await store.readSession() : null;
    if (saved?.session_id) {
      const t = new HttpTransport(saved.server ?? (settings.server || location.origin), { authKey: settings.key });
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
  running = startFromForm();
});

// A saved run on picked images: it resumes when the same images are picked again.
let localResume = null;

/** Train on what the form names: the picked images (decoded here first), or the data URL. */
async function startFromForm() {
  const picked = $('images').files?.length ? $('images').files : $('image-files').files;
  if (!picked?.length) return run();
  $('start').disabled = true;
  try {
    const local = await pickedImages(picked);
    if (local) {
      const saved = localResume;
      localResume = null;
      await run(saved, local);
    }
  } finally {
    $('start').disabled = false;
  }
}

/**
 * Decode the picked files in this page with TF.js (cpu: the Python device's float32 steps)
 * for the server's model; null (and the error shown) when they cannot train it.
 */
async function pickedImages(files) {
  setStatus(`decoding ${files.length} picked files in this page…`);
  try {
    const [tf, { imagesToFrames }] = await Promise.all([import('@tensorflow/tfjs'), import('./page_data.mjs')]);
    await tf.setBackend('cpu');
    const base = settings.server ? new URL(settings.server, location.href).href.replace(/\/$/, '') : location.origin;
    const r = await fetch(`${base}/v1/manifest`);
    if (!r.ok) throw new Error(`cannot fetch the manifest: HTTP ${r.status}`);
    const manifest = await r.json();
    const out = await imagesToFrames(tf, files, manifest, (done, total) => setStatus(`decoding images in this page: ${done}/${total}`));
    $('data-note').textContent = `your images: ${out.count} from ${out.source}, ${out.classes.length} classes (${out.classes.join(', ')})`;
    return out;
  } catch (err) {
    Object.assign(result, { status: 'error', error: `${err.name}: ${err.message}` });
    setStatus(`error: ${err.message}`, true);
    return null;
  }
}
$('restart').addEventListener('click', () => startOver());
$('model').textContent = 'ready';
markBackends();

/** Mark the backend options this browser cannot offer (the worker checks again, and says why). */
async function markBackends() {
  const option = (v) => $('backend').querySelector(`option[value="${v}"]`);
  const canvas = document.createElement('canvas');
  const gl = canvas.getContext('webgl2');
  if (!(gl ?? canvas.getContext('webgl'))) {
    option('webgl').disabled = true;
    option('webgl').textContent = 'webgl (no WebGL here)';
  } else if (simulateFloat16 || !gl?.getExtension('EXT_color_buffer_float')) {
    // TF.js decides from its own test in the worker; this is the page's early hint
    option('webgl').textContent = 'webgl (float16 only here?)';
  }
  gl?.getExtension('WEBGL_lose_context')?.loseContext();
  let adapter = null;
  try {
    adapter = await navigator.gpu?.requestAdapter();
  } catch {
    adapter = null;
  }
  if (!adapter) {
    option('webgpu').disabled = true; // the worker trains on cpu and says so if asked anyway
    option('webgpu').textContent = 'webgpu (not in this browser)';
  }
}

// An unfinished run saved in this browser resumes on load; otherwise auto=1 starts one.
(async () => {
  let saved = null;
  try {
    saved = await store.readSession();
  } catch (err) {
    storeWorks = false;
    console.warn(`IndexedDB unavailable, runs will not survive a reload: ${err.message}`);
  }
  if (saved?.page && String(saved.page.data).startsWith('local:')) {
    localResume = saved; // the page cannot read the user's files again by itself
    $('resume').hidden = false;
    $('resume').textContent = `an unfinished run on your images (${saved.page.data.slice(6)}) is saved: pick the same images and press Train to resume it`;
  } else if (saved?.page) running = run(saved);
  else if (params.get('auto') === '1') running = run();
})();
