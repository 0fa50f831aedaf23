/**
 * The page's training, in a module worker (started through worker_boot.mjs), so that a step's
 * computation never blocks the page: its UI, progress and chart update while A and C compute.
 * The same modules as the Node device (slices, loop, codec, transport, state); the run is kept
 * in IndexedDB (state_idb.mjs), which a worker reaches like the page.
 *
 * Messages from the page:
 *   {type: 'start', settings: {data, batch, epochs, steps, seed, aux, backend, f16, transport},
 *    resume: bool, server, schema, simulateFloat16, key (enrolment key, or null),
 *    dataBytes (the user's images as a frames message, decoded by the page; else null)}
 *   {type: 'stop'}            finish the current step, save it, stop (Start over)
 * Messages to the page (all {type, ...}):
 *   status {text, error}  model {text}  backend {name, requested, note, float32, drift, refused}
 *   server {transport, parallel, text}  synced {syncs}
 *   total {total}  resumed {at, from, text}  running {step}  stepStart {step}
 *   step {record}  done {text, weights, transport}  stopped  error {error, text}  ended {finished}
 *
 * Transport (settings.transport): 'http', or 'ws' -- the browser's native WebSocket for every
 * op's frames (transport.mjs WsTransport). Against `spliteasy serve --mode parallel` (the
 * server's health says so) A and C are averaged with the round's other devices every
 * sync_every rounds through POST /v1/sessions/{sid}/sync (parallel.mjs), as train.mjs does.
 */

import { fetchDeviceModels, fetchManifest } from './bundle_http.mjs';
import { parseData, schedule } from './data.mjs';
import { sha256Hex } from './digest.mjs';
import { DeviceError } from './errors.mjs';
import { SplitTrainer, startRun, train } from './loop.mjs';
import { SHUFFLE_RULE, shuffled } from './shuffle.mjs';
import { TfjsSlices } from './slices.mjs';
import { RunState } from './state.mjs';
import { IdbStateStore } from './state_idb.mjs';
import { syncSlices } from './parallel.mjs';
import { describeWait, makeTransport } from './transport.mjs';
import { chooseBackend } from './web_backend.mjs';

const post = (type, fields = {}) => self.postMessage({ type, ...fields });
let stopRequested = false;
let busy = false;

/** The page's messages (worker_boot.mjs forwards them here). */
export function handle(msg) {
  if (msg?.type === 'stop') stopRequested = true;
  else if (msg?.type === 'start') {
    if (busy) {
      post('error', { error: 'DeviceError: a run is already going', text: 'a run is already going' });
      return;
    }
    busy = true;
    run(msg).finally(() => {
      busy = false;
    });
  }
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

/** One run: a new one, or (`resume`) the one saved in IndexedDB, with the settings `st`. */
async function run({ settings: st, resume, server, schema: schemaUrl, simulateFloat16 = false, key = null, dataBytes = null }) {
  stopRequested = false;
  const status = (text, error = false) => post('status', { text, error });
  const store = new IdbStateStore(`run:${new URL(server).origin}`);
  let storeWorks = true;
  let trainer = null;
  let rt = null;
  let transport = null;
  let finished = false;
  try {
    try {
      if (!resume) await store.clear(); // a new run replaces whatever was saved
    } catch (err) {
      storeWorks = false;
      console.warn(`IndexedDB unavailable, the run will not survive a reload: ${err.message}`);
    }
    status(`loading TF.js (${st.backend ?? 'cpu'} backend), the manifest and slices A/C…`);
    const backend = await chooseBackend(st.backend ?? 'cpu', { acceptFloat16: Boolean(st.f16), simulateFloat16 });
    post('backend', {
      name: backend.name,
      requested: backend.requested,
      note: backend.note,
      float32: backend.float32,
      drift: backend.drift,
      refused: backend.refused ?? null,
      gpu: backend.gpu,
    });
    let waiting = false;
    transport = makeTransport(st.transport === 'ws' ? 'ws' : 'http', server, {
      authKey: key, // enrolment key for a server started with --auth-keys (?key=)
      onWait: (w) => {
        waiting = true;
        status(describeWait(w), true);
      },
    });
    // spliteasy serve --mode parallel: average A and C with the round's other devices
    const parallel = (await transport.getJson('/v1/health')).parallel ?? null;
    const kind = st.transport === 'ws' ? 'websocket' : 'http';
    post('server', {
      transport: { kind: st.transport === 'ws' ? 'ws' : 'http', connections: 0 },
      parallel,
      text: parallel
        ? `parallel rounds of ${parallel.devices_per_round} devices, A and C averaged every ${parallel.sync_every} round(s); frames over ${kind}`
        : `devices take turns on B; frames over ${kind}`,
    });
    let syncs = 0;
    const schema = JSON.parse(new TextDecoder().decode(await fetchBytes(schemaUrl, 'the manifest schema')));
    const { manifest, digest } = await fetchManifest(transport, schema);
    post('model', {
      text:
        `${manifest.model}, ${manifest.split_mode} split at ${manifest.cuts.map((c) => c.name).join(' | ')}; ` +
        `${manifest.optimizer.name} lr ${manifest.optimizer.learning_rate}`,
    });
    const models = await fetchDeviceModels(transport, manifest);
    // The user's own images arrive decoded by the page (page_data.mjs) as a frames message;
    // anything else is a data URL.
    const bytes = dataBytes ? new Uint8Array(dataBytes) : await fetchBytes(st.data, 'the training data');
    const data = parseData(bytes, manifest.input, manifest);
    rt = new TfjsSlices(manifest, models);
    trainer = new SplitTrainer(rt, transport, manifest, digest, { auxLabel: st.aux, codec: st.codec ?? 'float32' });
    const plan = { batchSize: st.batch, epochs: st.epochs, steps: st.steps ?? Infinity };
    if (st.seed !== null && st.seed !== undefined) plan.order = (d, epoch) => shuffled(d, st.seed, epoch);
    const sched = schedule(data, plan);
    const total = sched.total;
    post('total', { total });
    const state = new RunState(storeWorks ? store : null);
    const runSpec = {
      manifest_sha256: digest,
      runtime: 'tfjs',
      aux_label: st.aux,
      ...(st.codec && st.codec !== 'float32' ? { codec: st.codec } : {}),
      data_sha256: await sha256Hex(bytes),
      n_samples: data.count,
      epochs: st.epochs,
      batch_size: st.batch,
      steps: st.steps,
      seed: st.seed,
      shuffle: st.seed === null || st.seed === undefined ? 'file order' : SHUFFLE_RULE,
    };
    const onEvent = (e) => {
      console.warn(e.message);
      status(e.message);
    };
    const start = await startRun(trainer, state, { server: transport.baseUrl, run: runSpec, extra: { page: st } }, sched, {
      onEvent,
    });
    if (start.resumed) {
      post('resumed', {
        at: start.at,
        from: start.from,
        text:
          `resumed at step ${start.at} of ${total} from this browser's saved run ` +
          `(session ${trainer.sessionId.slice(0, 8)}…${start.at !== start.from ? `; saved at step ${start.from}, the server's checkpoint is at ${start.at}` : ''})`,
      });
    }
    post('running', { step: trainer.nextStep });
    const training = `training on ${backend.name}: ${data.count} samples, ${total} steps of ${st.batch}`;
    status(training);
    post('stepStart', { step: trainer.nextStep });
    const records = await train(trainer, sched, {
      state,
      onEvent,
      shouldStop: () => stopRequested,
      onStep: async (r, batch) => {
        if (parallel && parallel.sync_every > 0 && (r.step + 1) % parallel.sync_every === 0) {
          await syncSlices(transport, rt, syncs, batch.y.length);
          syncs += 1;
          post('synced', { syncs });
        }
        post('step', { record: { ...r, backend: backend.name } });
        if (waiting) status(training); // the server is back
        waiting = false;
        // let the page's messages (stop) in before the next step
        await new Promise((resolve) => setTimeout(resolve, 0));
        if (trainer.nextStep < total && !stopRequested) post('stepStart', { step: trainer.nextStep });
      },
    });
    if (stopRequested) {
      post('stopped');
      return;
    }
    finished = true;
    const first = records[0]?.loss;
    const last = records.at(-1)?.loss;
    // A's and C's final variables (weights() of the Node CLI's --weights-out), so a test can
    // compare what the page trained with unsplit Keras, not only its losses.
    await rt.prefetch(); // webgpu reads back asynchronously only
    const weights = Object.fromEntries(
      Object.entries(rt.weights()).map(([part, vars]) => [
        part,
        Object.fromEntries(Object.entries(vars).map(([k, w]) => [k, { shape: w.shape, data: Array.from(w.data) }])),
      ]),
    );
    post('done', {
      weights,
      transport: { kind: st.transport === 'ws' ? 'ws' : 'http', connections: transport.connections ?? null },
      text:
        `done: ${total} steps` +
        (records.length ? `, loss ${first.toFixed(4)} → ${last.toFixed(4)}` : '') +
        (start.resumed ? ` (resumed at step ${start.at})` : '') +
        `, on ${backend.name}`,
    });
  } catch (err) {
    console.error(err);
    post('error', { error: `${err.name}: ${err.message}`, text: `error: ${err.message}` });
  } finally {
    // a finished run ends its session and forgets its state; an interrupted one keeps both
    try {
      if (finished) {
        await trainer?.close();
        if (storeWorks) await store.clear();
      }
    } catch (err) {
      console.warn(`could not end the finished run's session: ${err.message}`);
    }
    rt?.dispose();
    transport?.drop?.(); // a kept session's WebSocket (an interrupted run) is closed, not leaked
    post('ended', { finished });
  }
}
