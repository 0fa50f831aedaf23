// The device step of tools/bench_device.mjs (A forward, C train, A backward, no server) in a
// browser page, on the backend named by ?backend= (cpu | webgl | webgpu, chosen as the device
// page chooses it: src/web_backend.mjs). ?bundle= is the URL of a bundle directory.
// tools/bench_browser.mjs serves this page and drives it: window.benchReady resolves to
// the backend report, window.benchSteps(n) times n steps (after the caller's warm-up).
import * as tf from '@tensorflow/tfjs';

import { usesSimd } from '../src/kernels.mjs';
import { artifactOf, deviceSlices, sliceOf } from '../src/manifest.mjs';
import { loadLayersModel, TfjsSlices } from '../src/slices.mjs';
import { chooseBackend } from '../src/web_backend.mjs';

const params = new URLSearchParams(location.search);
const bundle = params.get('bundle').replace(/\/$/, '');
const batch = Number(params.get('batch') ?? 16);
const out = document.getElementById('out');

async function bytes(path) {
  const r = await fetch(`${bundle}/${path}`);
  if (!r.ok) throw new Error(`GET ${path}: ${r.status}`);
  return r.arrayBuffer();
}

async function setUp() {
  const backend = await chooseBackend(params.get('backend') ?? 'cpu');
  const manifest = JSON.parse(new TextDecoder().decode(await bytes('manifest.json')));
  const models = {};
  for (const name of deviceSlices(manifest)) {
    const art = artifactOf(sliceOf(manifest, name), 'tfjs_layers');
    const modelJson = JSON.parse(new TextDecoder().decode(await bytes(`${art.path}/model.json`)));
    models[name] = await loadLayersModel(modelJson, (p) => bytes(`${art.path}/${p}`));
  }
  const rt = new TfjsSlices(manifest, models);
  const shapeOf = (sym) => [batch, ...sym.shape.slice(1)];
  const x = tf.randomUniform(shapeOf(models.A.inputs[0]), 0, 1, 'float32', 1);
  const gA = tf.mul(tf.randomNormal(shapeOf(models.A.outputs[0]), 0, 1, 'float32', 2), 1e-3);
  const b = models.C ? tf.randomUniform(shapeOf(models.C.inputs[0]), 0, 1, 'float32', 3) : null;
  const y = tf.tensor1d(Array.from({ length: batch }, (_, i) => i % manifest.num_classes), 'int32');
  let lastLoss = null;
  // Reads with data() (the one read webgpu has; the same values on cpu and webgl).
  const step = async () => {
    const t0 = performance.now();
    const a = rt.aForward(x);
    await a.data();
    const t1 = performance.now();
    if (b) {
      const { gB, loss, lossTensor } = rt.cTrain(b, y);
      await gB.data();
      lastLoss = lossTensor ? (await lossTensor.data())[0] : loss;
      tf.dispose([gB, lossTensor ?? []]);
    }
    const t2 = performance.now();
    rt.aBackward(gA);
    await rt.a.trainableWeights[0]?.read().data(); // A's update has run (on a GPU too)
    const t3 = performance.now();
    a.dispose();
    return {
      a_forward_s: (t1 - t0) / 1000,
      c_train_s: (t2 - t1) / 1000,
      a_backward_s: (t3 - t2) / 1000,
      step_s: (t3 - t0) / 1000,
    };
  };
  window.benchSteps = async (n) => {
    const steps = [];
    for (let i = 0; i < n; i++) {
      steps.push(await step());
      await new Promise((r) => setTimeout(r, 0)); // let the page breathe between steps
    }
    return { steps, loss: lastLoss, tensors: tf.memory().numTensors };
  };
  return {
    backend: tf.getBackend(),
    requested: backend.requested,
    note: backend.note,
    drift: backend.drift,
    gpu: backend.gpu,
    simd: usesSimd(),
    userAgent: navigator.userAgent,
  };
}

window.benchReady = setUp().then(
  (r) => {
    out.textContent = JSON.stringify(r, null, 1);
    return r;
  },
  (err) => {
    out.textContent = `error: ${err.stack ?? err}`;
    return { error: String(err.stack ?? err) };
  },
);
