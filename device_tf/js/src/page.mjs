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
 * {status: "idle"|"loading"|"running"|"done"|"error", losses, records, error} for automation.
 */

import { initBackend } from './backend.mjs';
import { fetchDeviceModels, fetchManifest } from './bundle_http.mjs';
import { batches, countSteps, parseData } from './data.mjs';
import { DeviceError } from './errors.mjs';
import { SplitTrainer, train } from './loop.mjs';
import { shuffled } from './shuffle.mjs';
import { TfjsSlices } from './slices.mjs';
import { HttpTransport } from './transport.mjs';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const result = { status: 'idle', losses: [], records: [], error: null };
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
$('data').value = settings.data;
$('batch').value = settings.batch;
$('epochs').value = settings.epochs;
if (settings.steps !== undefined) $('steps').value = settings.steps;
if (settings.seed !== undefined) $('seed').value = settings.seed;

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

async function run() {
  const form = new FormData($('controls'));
  const plan = {
    batchSize: Number(form.get('batch')),
    epochs: Number(form.get('epochs')) || 1,
    steps: form.get('steps') ? Number(form.get('steps')) : Infinity,
  };
  const seed = form.get('seed');
  if (seed !== '' && seed !== null) plan.order = (d, epoch) => shuffled(d, Number(seed), epoch);
  $('start').disabled = true;
  Object.assign(result, { status: 'loading', losses: [], records: [], error: null });
  $('log').replaceChildren();
  drawChart([]);
  let trainer = null;
  try {
    setStatus('loading TF.js, the manifest and slices A/C…');
    await initBackend();
    const transport = new HttpTransport(settings.server || location.origin);
    const schema = JSON.parse(new TextDecoder().decode(await fetchBytes(settings.schema, 'the manifest schema')));
    const { manifest, digest } = await fetchManifest(transport, schema);
    $('model').textContent =
      `${manifest.model}, ${manifest.split_mode} split at ${manifest.cuts.map((c) => c.name).join(' | ')}; ` +
      `${manifest.optimizer.name} lr ${manifest.optimizer.learning_rate}`;
    const models = await fetchDeviceModels(transport, manifest);
    const data = parseData(await fetchBytes(String(form.get('data')), 'the training data'), manifest.input);
    const rt = new TfjsSlices(manifest, models);
    trainer = new SplitTrainer(rt, transport, manifest, digest, { auxLabel: settings.aux });
    const total = countSteps(data, plan);
    $('total').textContent = total;
    await trainer.open();
    result.status = 'running';
    setStatus(`training: ${data.count} samples, ${total} steps of ${plan.batchSize}`);
    let done = 0;
    await train(trainer, batches(data, plan), {
      onStep: async (r) => {
        done += 1;
        result.losses.push(r.loss);
        result.records.push(r);
        showStep(r, done, total, result.records);
        await new Promise((resolve) => setTimeout(resolve, 0)); // let the page repaint
      },
    });
    const first = result.losses[0];
    const last = result.losses.at(-1);
    setStatus(`done: ${done} steps, loss ${first.toFixed(4)} → ${last.toFixed(4)}`);
    result.status = 'done';
  } catch (err) {
    console.error(err);
    result.error = `${err.name}: ${err.message}`;
    result.status = 'error';
    setStatus(`error: ${err.message}`, true);
  } finally {
    await trainer?.close();
    $('start').disabled = false;
  }
}

$('controls').addEventListener('submit', (ev) => {
  ev.preventDefault();
  run();
});
$('model').textContent = 'ready';
if (params.get('auto') === '1') run();
