#!/usr/bin/env node
/**
 * The TF.js device from the command line: trains slices A and C of a spliteasy bundle
 * against the server that trains B.
 *
 *   node device_tf/js/train.mjs --bundle DIR --server URL --data FILE [--epochs E]
 *        [--batch-size B] [--steps N] [--seed S] [--aux-label] [--log-json FILE]
 *        [--weights-out FILE] [--eval-data FILE] [--state-dir DIR] [--reconnect-timeout S]
 *        [--codec float32|fp16|bf16|int8|int8-channel|int4]
 *
 * Without --bundle the slices are fetched from the server (as the browser page does).
 * The data file is a spliteasy frame message with x and y (src/data.mjs), or a folder of
 * images in class subfolders / an .npz, which `spliteasy data` decodes (src/data_folder.mjs). --log-json writes
 * every step's metrics; --weights-out the trained variables of A and C as JSON
 * {"A": {"layer/var": {"shape": [...], "data": [...]}}, "C": ...}. --eval-data (same format)
 * reports accuracy after each epoch: A and C here, B on the server in inference mode.
 *
 * --state-dir DIR keeps the run (src/state_fs.mjs): after every step A, C, their optimizer
 * state and the position in the data are saved atomically; the same command run again
 * with the same DIR (after a crash, a SIGKILL, a reboot) continues the same session at the
 * exact batch it stopped at. Whether or not it is given, the device follows the server
 * through a restart from its checkpoint (rolls back to the step the server resumed at and
 * replays), and waits for an unreachable server up to --reconnect-timeout seconds (300).
 * Exit status: 0 done, 2 a problem spliteasy names (bad bundle, data, server answer), 1 a bug.
 */

import { readFile, writeFile } from 'node:fs/promises';
import { parseArgs } from 'node:util';

import { initBackend } from './src/backend.mjs';
import { loadDeviceModels, readManifest, readSchema } from './src/bundle_node.mjs';
import { fetchDeviceModels, fetchManifest } from './src/bundle_http.mjs';
import { batches, parseData, schedule } from './src/data.mjs';
import { dataFileFor } from './src/data_folder.mjs';
import { sha256Hex } from './src/digest.mjs';
import { CODEC_NAMES } from './src/codec.mjs';
import { DeviceError, SpliteasyError } from './src/errors.mjs';
import { SplitTrainer, startRun, train } from './src/loop.mjs';
import { metricName, score } from './src/losses.mjs';
import { SHUFFLE_RULE, shuffled } from './src/shuffle.mjs';
import { TfjsSlices } from './src/slices.mjs';
import { RunState } from './src/state.mjs';
import { FileStateStore } from './src/state_fs.mjs';
import { syncSlices } from './src/parallel.mjs';
import { describeWait, makeTransport } from './src/transport.mjs';

const USAGE = `usage: node train.mjs --server URL --data FILE [--bundle DIR] [--epochs E] [--batch-size B]
                      [--steps N] [--seed S] [--aux-label] [--log-json FILE] [--weights-out FILE]
                      [--eval-data FILE] [--state-dir DIR] [--reconnect-timeout S] [--auth-key KEY] [--transport http|ws] [--quiet]
                      [--codec ${CODEC_NAMES.join('|')}]   (wire codec of activations and gradients)`;

function options(argv) {
  const { values } = parseArgs({
    args: argv,
    options: {
      bundle: { type: 'string' },
      server: { type: 'string' },
      data: { type: 'string' },
      epochs: { type: 'string', default: '1' },
      'batch-size': { type: 'string', default: '32' },
      steps: { type: 'string' },
      seed: { type: 'string' },
      'aux-label': { type: 'boolean', default: false },
      codec: { type: 'string', default: 'float32' },
      'log-json': { type: 'string' },
      'weights-out': { type: 'string' },
      'eval-data': { type: 'string' },
      'state-dir': { type: 'string' },
      'reconnect-timeout': { type: 'string', default: '300' },
      'auth-key': { type: 'string' },
      transport: { type: 'string', default: 'http' },
      quiet: { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
    strict: true,
  });
  if (values.help) {
    console.log(USAGE);
    process.exit(0);
  }
  const int = (name, min) => {
    const v = values[name];
    if (v === undefined) return undefined;
    const n = Number(v);
    if (!Number.isInteger(n) || n < min) throw new DeviceError(`--${name} must be an integer >= ${min}, got ${v}`);
    return n;
  };
  const seconds = (name) => {
    const n = Number(values[name]);
    if (!Number.isFinite(n) || n < 0) throw new DeviceError(`--${name} must be a number of seconds >= 0, got ${values[name]}`);
    return n;
  };
  if (!values.server) throw new DeviceError('--server URL is required');
  if (!values.data) throw new DeviceError('--data FILE is required (a spliteasy frames file with x and y)');
  return {
    bundle: values.bundle,
    server: values.server,
    data: values.data,
    epochs: int('epochs', 1),
    batchSize: int('batch-size', 1),
    steps: int('steps', 1) ?? Infinity,
    seed: int('seed', 0),
    auxLabel: values['aux-label'],
    codec: CODEC_NAMES.includes(values.codec)
      ? values.codec
      : (() => {
          throw new SpliteasyError(`--codec must be one of ${CODEC_NAMES.join(', ')}, not ${values.codec}`);
        })(),
    logJson: values['log-json'],
    weightsOut: values['weights-out'],
    evalData: values['eval-data'],
    stateDir: values['state-dir'],
    reconnectTimeout: seconds('reconnect-timeout'),
    // enrolment key (server --auth-keys); a custom CA for https: NODE_EXTRA_CA_CERTS=ca.pem
    authKey: values['auth-key'] ?? process.env.SPLITEASY_AUTH_KEY ?? null,
    // http: a request per op; ws: one WebSocket for the whole run (same frames, same retries)
    transport: ['http', 'ws'].includes(values.transport)
      ? values.transport
      : (() => {
          throw new SpliteasyError(`--transport must be http or ws, not ${values.transport}`);
        })(),
    quiet: values.quiet,
  };
}

const fmt = (r) =>
  `loss ${r.loss.toFixed(4)} | device ${r.device_ms.toFixed(1)} ms, server ${r.server_ms.toFixed(1)} ms, ` +
  `codec ${r.codec_ms.toFixed(2)} ms, wire ${r.wire_ms.toFixed(1)} ms | up ${(r.bytes_up / 1024).toFixed(1)} KiB, ` +
  `down ${(r.bytes_down / 1024).toFixed(1)} KiB`;

async function main(argv) {
  const opt = options(argv);
  const log = opt.quiet ? () => {} : (s) => console.log(s);
  await initBackend();
  const schema = await readSchema();
  // losing and regaining the server are worth a line each, --quiet or not
  const onWait = (w) => {
    if (w.attempt === 2) console.error(`spliteasy-js: ${describeWait(w)}`);
  };
  const onBack = (b) => console.error(`spliteasy-js: ${b.url} is back after ${(b.waitedMs / 1000).toFixed(1)} s; continuing`);
  const transport = makeTransport(opt.transport, opt.server, {
    reconnectTimeoutMs: opt.reconnectTimeout * 1000,
    onWait,
    onBack,
    authKey: opt.authKey,
  });
  // spliteasy serve --mode parallel: average A and C with the round's other devices
  // every sync_every steps (src/parallel.mjs)
  const parallel = (await transport.getJson('/v1/health')).parallel ?? null;
  let syncs = 0;
  let manifest;
  let digest;
  let models;
  if (opt.bundle) {
    ({ manifest, digest } = await readManifest(opt.bundle, schema));
    models = await loadDeviceModels(opt.bundle, manifest);
  } else {
    ({ manifest, digest } = await fetchManifest(transport, schema));
    models = await fetchDeviceModels(transport, manifest);
  }
  // a folder of images or an .npz: decoded by `spliteasy data` (src/data_folder.mjs)
  const { file: dataFile } = await dataFileFor(opt.data, opt.bundle ?? opt.server, log);
  const dataBytes = await readData(dataFile);
  const data = parseData(dataBytes, manifest.input, manifest);
  const evalData = opt.evalData ? parseData(await readData(opt.evalData), manifest.input, manifest) : null;
  const rt = new TfjsSlices(manifest, models);
  const trainer = new SplitTrainer(rt, transport, manifest, digest, { auxLabel: opt.auxLabel, codec: opt.codec });
  const plan = { batchSize: opt.batchSize, epochs: opt.epochs, steps: opt.steps };
  if (opt.seed !== undefined) plan.order = (d, epoch) => shuffled(d, opt.seed, epoch);
  const sched = schedule(data, plan);
  const total = sched.total;
  log(
    `spliteasy TF.js device: ${manifest.model} (${manifest.split_mode} split), ${data.count} samples, ` +
      `${total} steps of ${opt.batchSize}, server ${opt.server}`,
  );
  const state = new RunState(opt.stateDir ? new FileStateStore(opt.stateDir) : null);
  await state.store?.lock();
  await state.store?.cleanTemp();
  const run = {
    manifest_sha256: digest,
    runtime: 'tfjs',
    aux_label: opt.auxLabel,
    ...(opt.codec !== 'float32' ? { codec: opt.codec } : {}), // the session's wire codec
    data_sha256: await sha256Hex(dataBytes),
    n_samples: data.count,
    epochs: opt.epochs,
    batch_size: opt.batchSize,
    steps: Number.isFinite(opt.steps) ? opt.steps : null,
    seed: opt.seed ?? null,
    shuffle: opt.seed === undefined ? 'file order' : SHUFFLE_RULE,
  };
  const onEvent = (e) => console.error(`spliteasy-js: ${e.message}`);
  const start = await startRun(trainer, state, { server: opt.server, run }, sched, { onEvent });
  if (start.resumed && !start.done) {
    log(
      `resumed at step ${start.at}/${total} (session ${trainer.sessionId.slice(0, 8)}…, state ${opt.stateDir}` +
        `${start.at !== start.from ? `, saved at step ${start.from}` : ''})`,
    );
  }
  let records = [];
  const evals = [];
  const perEpoch = sched.perEpoch;
  try {
    if (!start.done) {
      records = await train(trainer, sched, {
        state,
        onEvent,
        onStep: async (r, batch) => {
          const done = r.step + 1;
          if (parallel && parallel.sync_every > 0 && done % parallel.sync_every === 0) {
            await syncSlices(transport, rt, syncs, batch.y.length);
            syncs += 1;
          }
          log(`step ${done}/${total} epoch ${r.epoch + 1} ${fmt(r)}`);
          const epochEnd = batch.index === perEpoch - 1 || done === total;
          if (evalData && epochEnd) {
            const acc = await evaluate(trainer, evalData, opt.batchSize);
            evals.push({ epoch: r.epoch + 1, step: done, accuracy: acc });
            log(`epoch ${r.epoch + 1}: ${metricName(manifest.loss)} ${acc.toFixed(4)} on ${evalData.count} samples`);
          }
        },
      });
    } else {
      log(`the state dir ${opt.stateDir} holds this run, finished at step ${total}: nothing to train`);
    }
  } finally {
    // a finished run ends its session; a failed one keeps it, to be resumed from the state dir
    if (trainer.nextStep >= total || !opt.stateDir) await trainer.close();
    transport.drop?.(); // a kept session's WebSocket would keep Node running
    await state.store?.unlock();
  }
  const mean = (k) => records.reduce((s, r) => s + r[k], 0) / Math.max(records.length, 1);
  const summary = {
    steps: records.length,
    first_loss: records[0]?.loss,
    last_loss: records.at(-1)?.loss,
    mean_device_ms: mean('device_ms'),
    mean_server_ms: mean('server_ms'),
    mean_codec_ms: mean('codec_ms'),
    mean_wire_ms: mean('wire_ms'),
    mean_total_ms: mean('total_ms'),
    codec: opt.codec,
    mean_bytes_up: mean('bytes_up'),
    mean_bytes_down: mean('bytes_down'),
    accuracy: evals,
    resumed_at: start.resumed ? start.at : null,
    final_step: trainer.nextStep,
  };
  if (records.length) {
    log(
      `done: ${summary.steps} steps, loss ${summary.first_loss.toFixed(4)} -> ${summary.last_loss.toFixed(4)}, ` +
        `mean step ${summary.mean_total_ms.toFixed(1)} ms`,
    );
  }
  if (opt.logJson) {
    const doc = { runtime: 'tfjs', backend: 'cpu', model: manifest.model, manifest_sha256: digest, records, summary };
    await writeFile(opt.logJson, JSON.stringify(doc, null, 1) + '\n');
  }
  if (opt.weightsOut) {
    const out = {};
    for (const [slice, ws] of Object.entries(rt.weights())) {
      out[slice] = Object.fromEntries(Object.entries(ws).map(([k, w]) => [k, { shape: w.shape, data: Array.from(w.data) }]));
    }
    await writeFile(opt.weightsOut, JSON.stringify(out));
  }
}

async function readData(path) {
  try {
    return new Uint8Array(await readFile(path));
  } catch (err) {
    throw new DeviceError(`cannot read data file ${path}: ${err.code ?? err.message}`);
  }
}

/**
 * The split model's validation score on `data` (accuracy, or the loss's own: losses.mjs
 * score), in batches through the server's /infer.
 */
async function evaluate(trainer, data, batchSize) {
  let total = 0;
  for (const b of batches(data, { batchSize: Math.max(batchSize, 256) })) {
    const out = await trainer.predict(b.x, b.shape);
    total += score(trainer.manifest.loss, out.data, b.y, out.shape[1]) * b.shape[0];
  }
  return total / data.count;
}

main(process.argv.slice(2)).catch((err) => {
  if (err instanceof SpliteasyError || err?.code === 'ERR_PARSE_ARGS_UNKNOWN_OPTION' || err?.code === 'ERR_PARSE_ARGS_INVALID_OPTION_VALUE') {
    console.error(`spliteasy-js train: error: ${err.message}`);
    process.exit(2);
  }
  console.error(err);
  process.exit(1);
});
