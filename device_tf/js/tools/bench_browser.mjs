// Device compute per training step in headless Chromium (issue #12's benchmark, the page's
// rows): serves device_tf/js and a bundle on 127.0.0.1, opens tools/bench_page.html on the
// requested backend, times --steps steps after one warm-up step, and prints one JSON line
// {backend, requested, note, gpu, simd, ..., a_forward_s, c_train_s, a_backward_s, step_s,
//  step_cpu_s, steps}. step_cpu_s is the CPU time of the whole Chromium process tree
// (renderer, and the GPU process where SwiftShader emulates the GPU) per step, from /proc.
// Usage: node tools/bench_browser.mjs BUNDLE [--backend cpu|webgl|webgpu] [--batch 16]
//        [--steps 3] [--chromium /usr/bin/chromium] [--gpu-flags] [--json FILE]
import { createReadStream } from 'node:fs';
import { mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { createServer } from 'node:http';
import { tmpdir } from 'node:os';
import { extname, join, normalize, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

import { chromium } from 'playwright-core';

const { values: opt, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    backend: { type: 'string', default: 'cpu' },
    batch: { type: 'string', default: '16' },
    steps: { type: 'string', default: '3' },
    chromium: { type: 'string', default: process.env.SPLITEASY_CHROMIUM ?? '/usr/bin/chromium' },
    // --enable-unsafe-webgpu: Chromium's WebGPU on Linux (SwiftShader's Vulkan here)
    'gpu-flags': { type: 'boolean', default: false },
    timeout: { type: 'string', default: '900000' },
    json: { type: 'string' },
  },
});
const JS_DIR = fileURLToPath(new URL('..', import.meta.url));
const BUNDLE = resolve(positionals[0]);
const TYPES = { '.mjs': 'text/javascript', '.js': 'text/javascript', '.html': 'text/html', '.json': 'application/json' };

/** GET /js/<path> from device_tf/js, /bundle/<path> from the bundle; nothing outside them. */
const server = createServer(async (req, res) => {
  const url = new URL(req.url, 'http://127.0.0.1');
  const [, root, ...rest] = decodeURIComponent(url.pathname).split('/');
  const base = root === 'js' ? JS_DIR : root === 'bundle' ? BUNDLE : null;
  const file = base && normalize(join(base, ...rest));
  if (!file || !file.startsWith(base) || !(await stat(file).catch(() => null))?.isFile()) {
    res.writeHead(404).end();
    return;
  }
  res.writeHead(200, { 'content-type': TYPES[extname(file)] ?? 'application/octet-stream' });
  createReadStream(file).pipe(res);
});
await new Promise((r) => server.listen(0, '127.0.0.1', r));
const origin = `http://127.0.0.1:${server.address().port}`;

/** CPU seconds (user + system) of process `root` and all its descendants, from /proc. */
async function treeCpu(root) {
  const hz = 100; // USER_HZ on Linux
  const procs = new Map();
  for (const name of await readdir('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    const text = await readFile(`/proc/${name}/stat`, 'utf8').catch(() => null);
    if (!text) continue;
    const f = text.slice(text.lastIndexOf(')') + 2).split(' ');
    procs.set(Number(name), { ppid: Number(f[1]), cpu: (Number(f[11]) + Number(f[12])) / hz });
  }
  let total = 0;
  const want = new Set([root]);
  let grew = true;
  while (grew) {
    grew = false;
    for (const [pid, p] of procs) {
      if (!want.has(pid) && want.has(p.ppid)) {
        want.add(pid);
        grew = true;
      }
    }
  }
  for (const pid of want) total += procs.get(pid)?.cpu ?? 0;
  return total;
}

/** The pid of the Chromium started with user data dir `profile`. */
async function browserPid(profile) {
  for (const name of await readdir('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    const cmd = await readFile(`/proc/${name}/cmdline`, 'utf8').catch(() => '');
    if (cmd.includes(`--user-data-dir=${profile}`) && !cmd.includes('--type=')) return Number(name);
  }
  return null;
}

const profile = await mkdtemp(join(tmpdir(), 'spliteasy-bench-chromium-'));
const args = ['--no-sandbox', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update'];
if (opt['gpu-flags']) args.push('--enable-unsafe-webgpu', '--enable-features=Vulkan');
const context = await chromium.launchPersistentContext(profile, { executablePath: opt.chromium, headless: true, args });
const timeout = Number(opt.timeout);
let result;
try {
  const page = context.pages()[0] ?? (await context.newPage());
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  page.setDefaultTimeout(timeout);
  const q = new URLSearchParams({ backend: opt.backend, batch: opt.batch, bundle: `${origin}/bundle` });
  await page.goto(`${origin}/js/tools/bench_page.html?${q}`, { waitUntil: 'load' });
  await page.waitForFunction(() => window.benchReady !== undefined);
  const ready = await page.evaluate(() => window.benchReady);
  if (ready.error) throw new Error(ready.error);
  await page.evaluate(() => window.benchSteps(1)); // warm-up: JIT, shader compilation
  const pid = await browserPid(profile);
  const c0 = pid ? await treeCpu(pid) : null;
  const n = Number(opt.steps);
  const run = await page.evaluate((k) => window.benchSteps(k), n);
  const c1 = pid ? await treeCpu(pid) : null;
  const median = (k) => run.steps.map((s) => s[k]).sort((p, q2) => p - q2)[Math.floor(n / 2)];
  result = {
    ...ready,
    ...Object.fromEntries(Object.keys(run.steps[0]).map((k) => [k, median(k)])),
    step_cpu_s: c0 === null ? null : (c1 - c0) / n,
    loss: run.loss,
    steps: run.steps,
    errors,
  };
} catch (err) {
  result = { error: String(err.message ?? err), backend: opt.backend };
} finally {
  await context.close();
  await rm(profile, { recursive: true, force: true });
  server.close();
}
const { steps: _, ...summary } = result;
console.log(JSON.stringify(summary));
if (opt.json) await writeFile(opt.json, JSON.stringify(result, null, 1));
