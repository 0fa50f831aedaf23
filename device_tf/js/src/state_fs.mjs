/**
 * The device state dir in Node (`train.mjs --state-dir DIR`), written the way
 * shared_schema/durable.py writes it, so Python reads what Node wrote and vice versa:
 *
 *   DIR/session.json   server, session id, token (mode 0600), manifest and data hashes, plan
 *   DIR/latest/        snapshot after the last completed step  } slices.safetensors,
 *   DIR/durable/       snapshot at the server's durable step   } optimizer.safetensors,
 *                                                              } progress.json, checksums.json
 *
 * A folder is never written in place: its files go into DIR/.tmp-<uuid>/ (each fsynced,
 * mode 0600), the folder is fsynced, the old folder is renamed aside to
 * .old-<name>-<uuid>/, the new one renamed into place, DIR fsynced, the aside copy removed.
 * A SIGKILL at any instruction leaves either the old or the new snapshot readable: a reader
 * that finds <name>/ missing or corrupt takes the aside copy. session.json is replaced the
 * same way as a single file (temp file, fsync, rename, fsync DIR).
 *
 * Test hook (as durable.py): SPLITEASY_DURABLE_CRASH_AFTER=N ends the process with status
 * 86 right after the N-th file of a folder is written (0: right after the temp folder).
 */

import { randomUUID } from 'node:crypto';
import { constants } from 'node:fs';
import { mkdir, open, readFile, readdir, rename, rm, stat, writeFile } from 'node:fs/promises';
import { hostname } from 'node:os';
import { join } from 'node:path';

import { DeviceError } from './errors.mjs';
import { checksumsOf } from './state.mjs';

const CRASH_ENV = 'SPLITEASY_DURABLE_CRASH_AFTER';
const CRASH_EXIT_CODE = 86;

async function fsyncPath(path, flags = constants.O_RDONLY) {
  const fh = await open(path, flags);
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

async function writeNew(path, data) {
  const fh = await open(path, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL, 0o600);
  try {
    await fh.writeFile(data);
    await fh.sync();
  } finally {
    await fh.close();
  }
}

function crashPoint(written) {
  const at = process.env[CRASH_ENV];
  if (at !== undefined && /^\d+$/.test(at.trim()) && Number(at) === written) process.exit(CRASH_EXIT_CODE);
}

function alive(pid) {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return err.code === 'EPERM';
  }
}

const exists = async (p) => {
  try {
    await stat(p);
    return true;
  } catch {
    return false;
  }
};

export class FileStateStore {
  constructor(dir, { warn = (m) => console.error(m) } = {}) {
    this.dir = dir;
    this.warn = warn;
  }

  async ensureDir() {
    await mkdir(this.dir, { recursive: true, mode: 0o700 });
  }

  async readSession() {
    let raw;
    try {
      raw = await readFile(join(this.dir, 'session.json'), 'utf8');
    } catch (err) {
      if (err.code === 'ENOENT') return null;
      throw new DeviceError(`cannot read ${join(this.dir, 'session.json')}: ${err.code ?? err.message}`);
    }
    try {
      return JSON.parse(raw);
    } catch (err) {
      throw new DeviceError(`${join(this.dir, 'session.json')} is not JSON (${err.message}); remove the state dir to start over`);
    }
  }

  /** session.json, atomically, mode 0600 (it holds the session's bearer token). */
  async writeSession(session) {
    await this.ensureDir();
    const tmp = join(this.dir, `.tmp-session-${randomUUID()}.json`);
    await writeNew(tmp, JSON.stringify(session, null, 1) + '\n');
    await rename(tmp, join(this.dir, 'session.json'));
    await fsyncPath(this.dir);
  }

  /**
   * The verified files of snapshot folder `name` (Map name -> Uint8Array), or null if there
   * is none. `verify(files, where)` throws on a corrupt one; a corrupt or missing folder
   * falls back to the aside copy a crash may have left; if nothing is intact: a warning, null.
   */
  async readSnapshot(name, verify) {
    const candidates = [join(this.dir, name)];
    let entries = [];
    try {
      entries = await readdir(this.dir);
    } catch {
      return null;
    }
    candidates.push(...entries.filter((e) => e.startsWith(`.old-${name}-`)).sort().map((e) => join(this.dir, e)));
    let firstError = null;
    for (const path of candidates) {
      if (!(await exists(path))) continue;
      let files;
      try {
        files = new Map();
        for (const f of await readdir(path)) files.set(f, new Uint8Array(await readFile(join(path, f))));
        return await verify(files, path);
      } catch (err) {
        firstError ??= err;
        this.warn(`spliteasy-js: skipping ${path}: ${err.message}`);
      }
    }
    if (firstError) this.warn(`spliteasy-js: no intact ${name}/ snapshot in ${this.dir}`);
    return null;
  }

  /** Create or atomically replace folder `name` with `files` (+ checksums.json). */
  async writeSnapshot(name, files) {
    await this.ensureDir();
    const target = join(this.dir, name);
    const tmp = join(this.dir, `.tmp-${randomUUID()}`);
    await mkdir(tmp, { mode: 0o700 });
    try {
      const all = new Map([...files].filter(([f]) => f !== 'checksums.json'));
      crashPoint(0);
      let i = 0;
      for (const f of [...all.keys()].sort()) {
        await writeNew(join(tmp, f), all.get(f));
        crashPoint(++i);
      }
      await writeNew(join(tmp, 'checksums.json'), files.get('checksums.json') ?? (await checksumsOf(all)));
      await fsyncPath(tmp);
    } catch (err) {
      await rm(tmp, { recursive: true, force: true });
      throw err;
    }
    let aside = null;
    if (await exists(target)) {
      aside = join(this.dir, `.old-${name}-${randomUUID()}`);
      await rename(target, aside);
    }
    await rename(tmp, target);
    await fsyncPath(this.dir);
    if (aside) await rm(aside, { recursive: true, force: true });
    for (const e of await readdir(this.dir)) {
      if (e.startsWith(`.old-${name}-`)) await rm(join(this.dir, e), { recursive: true, force: true });
    }
  }

  /**
   * Hold the state dir for this process (two devices on one dir would interleave their
   * snapshots): DIR/.lock names the holder's pid; a lock whose process is gone (SIGKILL)
   * is taken over. (Node has no flock; the Python runtimes flock the same file, whose
   * content they ignore. A state dir of another runtime is refused anyway.)
   */
  async lock() {
    await this.ensureDir();
    const path = join(this.dir, '.lock');
    let holder = null;
    try {
      holder = JSON.parse(await readFile(path, 'utf8'));
    } catch {
      // none, empty (a Python device's flock file) or torn: free
    }
    const pid = Number(holder?.pid);
    if (Number.isInteger(pid) && pid > 0 && pid !== process.pid && holder?.host === hostname() && alive(pid)) {
      throw new DeviceError(`the state dir ${this.dir} is in use by another running device (pid ${pid})`);
    }
    const tmp = join(this.dir, `.tmp-lock-${randomUUID()}`);
    await writeNew(tmp, JSON.stringify({ pid: process.pid, host: hostname(), runtime: 'tfjs' }));
    await rename(tmp, path);
    this.locked = path;
  }

  /** Give the state dir back (a process that dies leaves a lock the next one takes over). */
  async unlock() {
    if (!this.locked) return;
    await writeFile(this.locked, '').catch(() => {});
    this.locked = null;
  }

  /** Remove temp folders a killed writer left behind. */
  async cleanTemp() {
    let entries = [];
    try {
      entries = await readdir(this.dir);
    } catch {
      return;
    }
    for (const e of entries) if (e.startsWith('.tmp-')) await rm(join(this.dir, e), { recursive: true, force: true });
  }

  async clear() {
    for (const name of ['latest', 'durable', 'session.json']) await rm(join(this.dir, name), { recursive: true, force: true });
  }
}
