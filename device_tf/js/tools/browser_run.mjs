// Drive the device page in headless Chromium (Debian's, via playwright-core) until it is
// done: tests/test_js_browser.py runs it. Prints one JSON line:
//   {result: window.spliteasyResult, dom: {status, loss, step}, console: [...], errors: [...]}
// Usage: node tools/browser_run.mjs URL [--chromium PATH] [--timeout MS]
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
  },
});
const [url] = positionals;
const timeout = Number(values.timeout);
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
  await page.goto(url, { waitUntil: 'load', timeout });
  await page.waitForFunction(
    () => ['done', 'error'].includes(window.spliteasyResult?.status),
    undefined,
    { timeout, polling: 200 },
  );
  const result = await page.evaluate(() => window.spliteasyResult);
  const dom = await page.evaluate(() => ({
    status: document.getElementById('status').textContent,
    loss: document.getElementById('loss').textContent,
    step: document.getElementById('step').textContent,
    total: document.getElementById('total').textContent,
    rows: document.getElementById('log').children.length,
    progress: document.getElementById('progress').value,
  }));
  console.log(JSON.stringify({ result, dom, console: consoleLines, errors }));
} catch (err) {
  console.log(JSON.stringify({ result: null, fatal: String(err), console: consoleLines, errors }));
} finally {
  await context.close();
  await rm(profile, { recursive: true, force: true });
}
