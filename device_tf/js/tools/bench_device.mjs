// Device compute per training step of a bundle's slices A and C in TF.js (Node, cpu backend):
// A's forward, C's forward + loss + backward + update, A's backward (recomputed forward,
// gradients, update) on fixed random inputs, with no server (issue #12's benchmark; the
// Python side is benchmarks/device_runtimes.py). --profile adds the kernels of one step,
// by total time. --own-kernels measures the cpu backend's own kernels instead (slow).
// Usage: node tools/bench_device.mjs BUNDLE [--steps 3] [--batch 16] [--profile] [--json FILE]
import { writeFile } from 'node:fs/promises';
import { parseArgs } from 'node:util';

import * as tf from '@tensorflow/tfjs';

import { initBackend } from '../src/backend.mjs';
import { loadDeviceModels, readManifest, readSchema } from '../src/bundle_node.mjs';
import { restoreKernels } from '../src/kernels.mjs';
import { TfjsSlices } from '../src/slices.mjs';

const { values: opt, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    steps: { type: 'string', default: '3' },
    batch: { type: 'string', default: '16' },
    profile: { type: 'boolean', default: false },
    'own-kernels': { type: 'boolean', default: false },
    json: { type: 'string' },
  },
});
await initBackend();
if (opt['own-kernels']) restoreKernels();
const dir = positionals[0];
const { manifest } = await readManifest(dir, await readSchema());
const models = await loadDeviceModels(dir, manifest);
const rt = new TfjsSlices(manifest, models);
const n = Number(opt.batch);
const shapeOf = (sym) => [n, ...sym.shape.slice(1)];
const x = tf.randomUniform(shapeOf(models.A.inputs[0]), 0, 1, 'float32', 1);
const gA = tf.mul(tf.randomNormal(shapeOf(models.A.outputs[0]), 0, 1, 'float32', 2), 1e-3);
const b = models.C ? tf.randomUniform(shapeOf(models.C.inputs[0]), 0, 1, 'float32', 3) : null;
const y = tf.tensor1d(Array.from({ length: n }, (_, i) => i % manifest.num_classes), 'int32');

/** CPU seconds (user + system, all threads): steadier than wall time on a shared machine. */
const cpuNow = () => {
  const c = process.cpuUsage();
  return (c.user + c.system) / 1e6;
};

function step() {
  const c0 = cpuNow();
  const t0 = performance.now();
  const a = rt.aForward(x);
  a.dataSync();
  const c1 = cpuNow();
  const t1 = performance.now();
  if (b) {
    const { gB } = rt.cTrain(b, y);
    gB.dataSync();
    gB.dispose();
  }
  const c2 = cpuNow();
  const t2 = performance.now();
  rt.aBackward(gA);
  const t3 = performance.now();
  const c3 = cpuNow();
  a.dispose();
  return {
    a_forward_s: (t1 - t0) / 1000,
    c_train_s: (t2 - t1) / 1000,
    a_backward_s: (t3 - t2) / 1000,
    step_s: (t3 - t0) / 1000,
    step_cpu_s: c3 - c0, // wall time inflates on a shared machine
    a_forward_cpu_s: c1 - c0,
    c_train_cpu_s: c2 - c1,
    a_backward_cpu_s: c3 - c2,
  };
}

step(); // warm-up: JIT and first-use allocations
const steps = Array.from({ length: Number(opt.steps) }, step);
const median = (k) => steps.map((s) => s[k]).sort((p, q) => p - q)[Math.floor(steps.length / 2)];
const result = Object.fromEntries(Object.keys(steps[0]).map((k) => [k, median(k)]));
result.steps = steps;
if (opt.profile) {
  const prof = await tf.profile(() => {
    step();
  });
  const byKernel = {};
  for (const k of prof.kernels) {
    const ms = await k.kernelTimeMs;
    if (typeof ms === 'number') byKernel[k.name] = (byKernel[k.name] ?? 0) + ms / 1000;
  }
  result.kernels_s = Object.fromEntries(Object.entries(byKernel).sort((p, q) => q[1] - p[1]));
}
const { steps: _, ...summary } = result;
delete summary.kernels_s;
console.log(JSON.stringify(summary));
if (opt.json) await writeFile(opt.json, JSON.stringify(result, null, 1));
