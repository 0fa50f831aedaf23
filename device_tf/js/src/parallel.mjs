/**
 * The device's part of `spliteasy serve --mode parallel` (issue #11): every `sync_every`
 * rounds, upload A's and C's variables (never data, never optimizer state) to
 * `POST /v1/sessions/{sid}/sync` as safetensors with metadata `sync` (this device's sync
 * count) and `batch` (its samples per step), and take back the batch-weighted average of
 * the round's devices. The same names as the Python device ("A/<layer>/<var>"), so Python
 * and TF.js devices average together.
 */

import { decodeSafetensors, encodeSafetensors } from './safetensors.mjs';

/** Average this device's slices with its peers'; returns how many devices it covered. */
export async function syncSlices(transport, rt, sync, batch) {
  const st = rt.exportState();
  const vars = new Map();
  for (const [slice, ws] of Object.entries(st.weights)) {
    for (const [name, w] of Object.entries(ws)) vars.set(`${slice}/${name}`, { shape: w.shape, data: w.data });
  }
  const body = encodeSafetensors(vars, { sync: String(sync), batch: String(batch) });
  const reply = await transport.send('POST', `/v1/sessions/${transport.sessionId}/sync`, {
    body,
    headers: { 'Content-Type': 'application/octet-stream', ...transport.auth() },
  });
  const { tensors, metadata } = decodeSafetensors(reply.body, 'the averaged slices');
  const weights = {};
  for (const [key, t] of tensors) {
    const cut = key.indexOf('/');
    (weights[key.slice(0, cut)] ??= {})[key.slice(cut + 1)] = t;
  }
  rt.importState({ weights, optimizers: st.optimizers, stepSeed: st.stepSeed });
  return Number(metadata?.devices ?? 0);
}
