/**
 * Entry of the page's training worker (a module worker started by page.mjs).
 *
 * Why a loader: the device modules in src/ are shared with Node and import their packages by
 * name ('@tensorflow/tfjs', '@cfworker/json-schema'). A page resolves those names through
 * its import map (web/index.html), but browsers do not apply a document's import map to
 * the workers it starts (Chromium 156 fails with "Failed to resolve module specifier").
 * So this file -- which imports nothing by name itself -- first tries the native import
 * (a browser that maps names in workers needs nothing more) and otherwise loads the
 * worker's module graph itself: it fetches each of our modules, points its imports of
 * mapped names at the packages' absolute URLs and its relative imports at the blob URLs of
 * the rewritten modules, and imports the result. Every module is loaded once, so TF.js'
 * kernel and layer registries are the ones the training code uses. Packages themselves are
 * imported by their real URL, natively.
 *
 * Protocol: the page's first message is {type: 'init', imports: {name: absolute URL}} (its
 * import map); later messages go to the training module's handle(message). Load failures
 * are posted as {type: 'error', ...} so the page can show them.
 */

import { importSpecifiers, rewriteImports } from './module_imports.mjs';

const pending = [];
let handle = null;

self.onmessage = async (ev) => {
  if (ev.data?.type !== 'init') {
    if (handle) handle(ev.data);
    else pending.push(ev.data);
    return;
  }
  // The page's import map, for modules loaded later by name (web_backend.mjs: the webgpu backend)
  self.spliteasyImportMap = ev.data.imports ?? {};
  try {
    const main = new URL('./page_worker.mjs', import.meta.url).href;
    let mod;
    try {
      mod = await import(main);
    } catch (err) {
      // a bare name the worker cannot resolve is a TypeError in every browser (with its own
      // wording: Chromium "Failed to resolve module specifier", Firefox "was a bare specifier")
      if (!(err instanceof TypeError)) throw err;
      mod = await importMapped(main, ev.data.imports ?? {});
    }
    handle = mod.handle;
    for (const msg of pending.splice(0)) handle(msg);
  } catch (err) {
    self.postMessage({ type: 'error', error: `${err.name}: ${err.message}`, text: `cannot start the training worker: ${err.message}` });
    self.postMessage({ type: 'ended', finished: false });
  }
};

/**
 * Import the module at `entry` with bare names resolved through `imports` (an import map's
 * "imports": {name: absolute URL}); see module_imports.mjs for the import forms handled.
 */
export async function importMapped(entry, imports) {
  const loaded = new Map(); // module URL -> Promise<blob URL>
  const loading = new Set(); // for a clear error on an import cycle

  async function load(url) {
    if (loading.has(url)) throw new Error(`import cycle through ${url}: the worker loader cannot load it`);
    if (!loaded.has(url)) {
      loading.add(url);
      loaded.set(
        url,
        (async () => {
          const r = await fetch(url);
          if (!r.ok) throw new Error(`cannot fetch module ${url}: HTTP ${r.status}`);
          const src = await r.text();
          const targets = new Map();
          for (const spec of importSpecifiers(src)) {
            if (Object.hasOwn(imports, spec)) targets.set(spec, imports[spec]);
            else if (/^(\.{1,2}\/|\/)/.test(spec)) targets.set(spec, await load(new URL(spec, url).href));
            else throw new Error(`${url} imports '${spec}', which the page's import map does not name`);
          }
          const out = rewriteImports(src, (spec) => targets.get(spec));
          loading.delete(url);
          return URL.createObjectURL(new Blob([`${out}\n//# sourceURL=${url}\n`], { type: 'text/javascript' }));
        })(),
      );
    }
    return loaded.get(url);
  }

  return import(await load(entry));
}
