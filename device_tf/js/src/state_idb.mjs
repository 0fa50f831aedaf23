/**
 * The device state of the browser page, in IndexedDB: the same records as the Node state
 * dir (state_fs.mjs), the same bytes --
 *
 *   "<ns>/session"  session.json's object (server, session id, token, run, page settings)
 *   "<ns>/latest"   {files: [[name, Uint8Array], ...]}  slices.safetensors,
 *   "<ns>/durable"  {files: ...}                         optimizer.safetensors,
 *                                                        progress.json, checksums.json
 *
 * in the object store "state" of the database "spliteasy-device". `ns` names the server
 * (one run per server per browser profile). Each write is one readwrite transaction with
 * durability "strict" (flushed before it completes), so a reload, a closed tab or a crash
 * leaves either the old record or the new one; checksums.json is checked on every read.
 */

const DB_NAME = 'spliteasy-device';
const STORE = 'state';

function promised(request) {
  return new Promise((resolve, reject) => {
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
}

function openDb() {
  const req = indexedDB.open(DB_NAME, 1);
  req.onupgradeneeded = () => req.result.createObjectStore(STORE);
  return promised(req);
}

export class IdbStateStore {
  constructor(ns, { warn = (m) => console.warn(m) } = {}) {
    this.ns = ns;
    this.warn = warn;
    this.db = null;
  }

  async tx(mode, fn) {
    this.db ??= await openDb();
    const t = this.db.transaction(STORE, mode, { durability: 'strict' });
    const done = new Promise((resolve, reject) => {
      t.oncomplete = resolve;
      t.onerror = () => reject(t.error);
      t.onabort = () => reject(t.error ?? new Error('IndexedDB transaction aborted'));
    });
    const out = await promised(fn(t.objectStore(STORE)));
    await done;
    return out;
  }

  key(name) {
    return `${this.ns}/${name}`;
  }

  async readSession() {
    return (await this.tx('readonly', (s) => s.get(this.key('session')))) ?? null;
  }

  async writeSession(session) {
    await this.tx('readwrite', (s) => s.put(session, this.key('session')));
  }

  /** The verified snapshot `name`, or null (none, or corrupt: a warning). */
  async readSnapshot(name, verify) {
    const rec = await this.tx('readonly', (s) => s.get(this.key(name)));
    if (!rec) return null;
    try {
      return await verify(new Map(rec.files), `IndexedDB ${this.key(name)}`);
    } catch (err) {
      this.warn(`spliteasy: skipping the saved ${name} snapshot: ${err.message}`);
      return null;
    }
  }

  async writeSnapshot(name, files) {
    await this.tx('readwrite', (s) => s.put({ files: [...files] }, this.key(name)));
  }

  async cleanTemp() {}

  async clear() {
    for (const name of ['session', 'latest', 'durable']) await this.tx('readwrite', (s) => s.delete(this.key(name)));
  }
}
