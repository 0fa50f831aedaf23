/**
 * Which TF.js backend the browser page trains on (issue #12): cpu (the default: the same
 * kernels as the Node device, so the same numbers), webgl where the GPU renders float32
 * textures, webgpu where the browser has a WebGPU adapter (loadWebgpuBackend).
 *
 * WebGL keeps tensors in textures. Where the GPU cannot render to float32 textures, TF.js
 * falls back to float16 ones (WEBGL_RENDER_FLOAT32_ENABLED false): 11-bit mantissas, so
 * activations, gradients and weights drift from what Keras computes. The page then trains
 * on cpu and says so, unless the user accepts the drift measured here, on this device, by
 * probe() below -- the same convolution and its gradients on cpu and on the candidate.
 *
 * The Keras-exact layers of layers.mjs are written in ordinary TF.js ops, so they run on
 * every backend; the fast cpu kernels (kernels.mjs) are registered for cpu only, and any
 * other backend runs its own kernels, whose agreement with cpu the browser tests check.
 */

import * as tf from '@tensorflow/tfjs';

import { initBackend } from './backend.mjs';

export const BACKENDS = ['cpu', 'webgl', 'webgpu'];

/** Relative error of the probe on a non-cpu backend above which it is not float32 (float16: ~1e-3). */
export const FLOAT32_PROBE_TOL = 1e-5;

/** Deterministic inputs for the probe (no Math.random: the figure must be reproducible). */
function filled(n, seed) {
  const out = new Float32Array(n);
  let s = seed >>> 0;
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    out[i] = s / 2 ** 32 - 0.5;
  }
  return out;
}

/**
 * A 3x3 convolution, its loss and gradients w.r.t. input and filter, on the current backend
 * (read back with data(): webgpu has no synchronous read).
 */
async function probeOnce() {
  const x = tf.tensor4d(filled(2 * 10 * 10 * 8, 1), [2, 10, 10, 8]);
  const w = tf.tensor4d(filled(3 * 3 * 8 * 16, 2), [3, 3, 8, 16]);
  const f = (a, b) => tf.sum(tf.square(tf.relu(tf.conv2d(a, b, 1, 'same'))));
  const [gx, gw] = tf.grads(f)([x, w]);
  const y = f(x, w);
  const out = await Promise.all([y, gx, gw].map(async (t) => (await t.data()).slice()));
  tf.dispose([x, w, gx, gw, y]);
  return out;
}

/**
 * The page's import map ({name: absolute URL}): the document's, or in the training worker
 * (where browsers apply no import map) the copy the page handed to worker_boot.mjs.
 */
function importMap() {
  if (globalThis.spliteasyImportMap) return globalThis.spliteasyImportMap;
  const el = globalThis.document?.querySelector('script[type="importmap"]');
  const map = el ? JSON.parse(el.textContent).imports ?? {} : {};
  return Object.fromEntries(Object.entries(map).map(([k, v]) => [k, new URL(v, document.baseURI).href]));
}

/**
 * Register TF.js' webgpu backend (@tensorflow/tfjs-backend-webgpu 4.22, loaded only when
 * asked for). Its ES module imports '@tensorflow/tfjs-core' by name; this page maps only
 * '@tensorflow/tfjs' (which re-exports core), and a worker maps no names at all, so the
 * module is fetched and its core imports pointed at the very tfjs module the device runs
 * (one engine, one kernel registry). Returns false where the page's map does not name it.
 */
export async function loadWebgpuBackend() {
  if (tf.findBackendFactory('webgpu')) return true;
  const map = importMap();
  const pkg = map['@tensorflow/tfjs-backend-webgpu'];
  const core = map['@tensorflow/tfjs'];
  if (!pkg || !core) return false;
  const r = await fetch(pkg);
  if (!r.ok) throw new Error(`cannot fetch ${pkg}: HTTP ${r.status}`);
  const src = (await r.text()).replace(/from\s*(["'])@tensorflow\/tfjs-core\1/g, `from${JSON.stringify(core)}`);
  const url = URL.createObjectURL(new Blob([src], { type: 'text/javascript' }));
  try {
    await import(url);
  } finally {
    URL.revokeObjectURL(url);
  }
  return Boolean(tf.findBackendFactory('webgpu'));
}

function relErr(got, want) {
  let num = 0;
  let den = 0;
  for (let i = 0; i < want.length; i++) {
    num = Math.max(num, Math.abs(got[i] - want[i]));
    den = Math.max(den, Math.abs(want[i]));
  }
  return den ? num / den : num;
}

/** The probe's largest relative error on `name` against cpu (leaves `name` as the backend). */
export async function probe(name) {
  await initBackend();
  const want = await probeOnce();
  if (!(await tf.setBackend(name))) throw new Error(`TF.js could not initialise its ${name} backend`);
  const got = await probeOnce();
  return Math.max(...got.map((g, i) => relErr(g, want[i])));
}

/** What this browser offers: {webgl: {...} | null, webgpu: {...} | null}. */
export async function describeGpu() {
  const out = { webgl: null, webgpu: null };
  try {
    const canvas = typeof OffscreenCanvas === 'undefined' ? null : new OffscreenCanvas(1, 1);
    const gl = canvas?.getContext('webgl2') ?? canvas?.getContext('webgl');
    if (gl) {
      const info = gl.getExtension('WEBGL_debug_renderer_info');
      out.webgl = {
        version: typeof WebGL2RenderingContext !== 'undefined' && gl instanceof WebGL2RenderingContext ? 2 : 1,
        renderer: String(gl.getParameter(info ? info.UNMASKED_RENDERER_WEBGL : gl.RENDERER)),
        colorBufferFloat: Boolean(gl.getExtension('EXT_color_buffer_float')),
      };
      gl.getExtension('WEBGL_lose_context')?.loseContext();
    }
  } catch {
    out.webgl = null;
  }
  try {
    const adapter = await globalThis.navigator?.gpu?.requestAdapter();
    if (adapter) out.webgpu = { adapter: adapter.info?.description || adapter.info?.vendor || 'yes' };
  } catch {
    out.webgpu = null;
  }
  return out;
}

/**
 * Set the backend for training. `requested`: 'cpu' | 'webgl' | 'webgpu'. `acceptFloat16`: train
 * on a float16-only GPU anyway. `simulateFloat16` (tests, and to see what a phone would do):
 * tell TF.js this GPU cannot render float32 textures, so webgl really computes in float16.
 * Returns {name: the backend in use, requested, note: a sentence for the page, float32,
 * drift: the probe's relative error against cpu (null on cpu), gpu: describeGpu()}.
 */
export async function chooseBackend(requested = 'cpu', { acceptFloat16 = false, simulateFloat16 = false } = {}) {
  if (!BACKENDS.includes(requested)) throw new Error(`unknown backend '${requested}' (one of ${BACKENDS.join(', ')})`);
  const gpu = await describeGpu();
  const onCpu = async (note) => {
    await initBackend();
    return { name: 'cpu', requested, note, float32: true, drift: null, gpu };
  };
  if (requested === 'cpu') return onCpu('cpu backend: the same kernels and numbers as the Node device');
  if (requested === 'webgpu') {
    if (!gpu.webgpu) return onCpu('this browser has no WebGPU adapter: training on cpu');
    // TF.js' webgpu backend (a separate package, @tensorflow/tfjs-backend-webgpu 4.22) reads
    // results back only asynchronously (its dataSync() returns zeros, measured in Chromium
    // 156): the device loop reads A's output, gradients and C's loss with data(), and the
    // slices download their variables before a snapshot (slices.mjs asyncReads/prefetch).
    let loaded;
    try {
      loaded = await loadWebgpuBackend();
    } catch (err) {
      return onCpu(`the webgpu backend failed to load (${err.message}): training on cpu`);
    }
    if (!loaded) return onCpu("this page's import map names no @tensorflow/tfjs-backend-webgpu: training on cpu");
  }
  if (requested === 'webgl') {
    if (!gpu.webgl) return onCpu('this browser has no WebGL: training on cpu');
    if (simulateFloat16) tf.env().set('WEBGL_RENDER_FLOAT32_CAPABLE', false);
  }
  let drift;
  try {
    drift = await probe(requested);
  } catch (err) {
    return onCpu(`the ${requested} backend failed to start (${err.message}): training on cpu`);
  }
  const float32 = requested === 'webgl' ? tf.env().getBool('WEBGL_RENDER_FLOAT32_ENABLED') : drift <= FLOAT32_PROBE_TOL;
  const where =
    requested === 'webgl' ? `WebGL ${gpu.webgl.version}, ${gpu.webgl.renderer}` : `WebGPU, adapter ${gpu.webgpu.adapter}`;
  const measured = `a test convolution's gradients differ from cpu by ${drift.toExponential(1)} relative`;
  if (!float32 && !acceptFloat16) {
    const r = await onCpu(
      `${requested} refused: this GPU renders only float16 textures (${where}); ${measured}, so training ` +
        "would drift from Keras' numbers. Training on cpu; tick \"accept float16\" (f16=1) to train on the GPU anyway.",
    );
    return { ...r, drift, refused: requested };
  }
  const precision = float32 ? 'float32' : 'float16 (drift accepted)';
  return { name: requested, requested, note: `${requested} backend, ${precision} (${where}); ${measured}`, float32, drift, gpu };
}
