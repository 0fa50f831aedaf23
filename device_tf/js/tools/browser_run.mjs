// Drive the device page in headless Chromium (Debian's, via playwright-core) until it is
// done: tests/test_js_browser.py and test_js_resume.py run it. Prints one JSON line:
//   {result: window.spliteasyResult, dom: {status, loss, step, resume, ...}, reload,
//    console: [...], errors: [...]}
// Usage: node tools/browser_run.mjs URL [--chromium PATH] [--timeout MS] [--reload-at-step N]
//        [--pick-folder DIR]
//
// --pick-folder DIR (URL without auto=1) hands the page's folder picker (<input
// webkitdirectory>) the folder DIR, as a user picking it would, then presses Train.
//
// --reload-at-step N reloads the page in the middle of a run: when the page sends the
// request that opens step N (its N+1-th forward, or step in a single split) -- steps
// 0..N-1 done and saved -- that request goes to the server, which applies it, but its reply
// is held back and the page reloaded with it in flight (the resumed page's repeat of it is
// answered from the server's retry store).
// `reload` reports {at: N, stepBefore: the page's step counter then}.
//
// --start-over-at-step N (URL without auto=1): press Train, at step N press "Start over",
// wait until the page is idle, reload it, and report the page as it then stands
// (`startOver`: {at, status after start over}); the run must not come back.
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';

import { chromium } from 'playwright-core';

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    chromium: { type: 'string', default: process.env.SPLITEASY_CHROMIUM ?? '/usr/bin/chromium' },
    timeout: { type: 'string', default: '300000' },
    'reload-at-step': { type: 'string' },
    'start-over-at-step': { type: 'string' },
    'pick-folder': { type: 'string' },
  },
});
const [url] = positionals;
const timeout = Number(values.timeout);
const reloadAt = values['reload-at-step'] === undefined ? null : Number(values['reload-at-step']);
const startOverAt = values['start-over-at-step'] === undefined ? null : Number(values['start-over-at-step']);
const profile = await mkdtemp(join(tmpdir(), 'spliteasy-chromium-'));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: values.chromium,
  headless: true,
  args: [
    '--no-sandbox', // root in a container; the page is our own, on loopback
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
  ],
});
const consoleLines = [];
const errors = [];
try {
  const page = context.pages()[0] ?? (await context.newPage());
  page.on('console', (m) => consoleLines.push(`${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => errors.push(String(e)));
  page.on('requestfailed', (r) => errors.push(`request failed: ${r.url()} ${r.failure()?.errorText}`));
  let reload = null;
  let held = null;
  let release;
  const hold = new Promise((r) => {
    release = r;
  });
  if (reloadAt !== null) {
    let opened = 0;
    await page.route(/\/v1\/sessions\/[0-9a-f]+\/(forward|step)$/, (route) => {
      if (held || route.request().method() !== 'POST') return route.continue();
      opened += 1;
      if (opened <= reloadAt) return route.continue();
      // The request of step N reaches the server (which applies it), but its reply never
      // reaches the page: the page is reloaded under it.
      held = route;
      route.fetch().then(release, release);
      return undefined;
    });
  }
  await page.goto(url, { waitUntil: 'load', timeout });
  if (values['pick-folder']) {
    await page.setInputFiles('#images', values['pick-folder']);
    await page.click('#start');
  }
  if (reloadAt !== null) {
    await Promise.race([
      hold,
      page.waitForFunction(() => ['done', 'error'].includes(window.spliteasyResult?.status), undefined, {
        timeout,
        polling: 200,
      }),
    ]);
    if (held) {
      const stepBefore = await page.evaluate(() => window.spliteasyResult.step);
      await page.reload({ waitUntil: 'load', timeout });
      await held.abort().catch(() => {});
      await page.unrouteAll({ behavior: 'ignoreErrors' });
      reload = { at: reloadAt, stepBefore };
    }
  }
  let startOver = null;
  if (startOverAt !== null) {
    await page.click('#start');
    await page.waitForFunction((n) => window.spliteasyResult?.step >= n, startOverAt, { timeout, polling: 50 });
    await page.click('#restart');
    await page.waitForFunction(() => window.spliteasyResult?.status === 'idle', undefined, { timeout, polling: 100 });
    startOver = { at: startOverAt, status: await page.textContent('#status') };
    await page.reload({ waitUntil: 'load', timeout });
    await page.waitForTimeout(2000); // time for a saved run, if any, to resume
  } else {
    await page.waitForFunction(
      () => ['done', 'error'].includes(window.spliteasyResult?.status),
      undefined,
      { timeout, polling: 200 },
    );
  }
  const result = await page.evaluate(() => window.spliteasyResult);
  const dom = await page.evaluate(() => ({
    status: document.getElementById('status').textContent,
    loss: document.getElementById('loss').textContent,
    step: document.getElementById('step').textContent,
    total: document.getElementById('total').textContent,
    rows: document.getElementById('log').children.length,
    progress: document.getElementById('progress').value,
    resume: document.getElementById('resume')?.hidden ? '' : document.getElementById('resume')?.textContent ?? '',
    backendUsed: document.getElementById('backend-used')?.textContent ?? null,
    backendNote: document.getElementById('backend-note')?.textContent ?? null,
  }));
  console.log(JSON.stringify({ result, dom, reload, startOver, console: consoleLines, errors }));
} catch (err) {
  console.log(JSON.stringify({ result: null, fatal: String(err), console: consoleLines, errors }));
} finally {
  await context.close();
  await rm(profile, { recursive: true, force: true });
}
