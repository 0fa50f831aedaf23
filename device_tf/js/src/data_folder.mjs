/**
 * Node: `--data FOLDER` (images in class subfolders) or `--data FILE.npz` for train.mjs.
 *
 * Node has no image decoder in the pinned install set (@tensorflow/tfjs-node needs a native
 * binary download), so the folder is decoded by the Python device's own code: `spliteasy
 * data` (spliteasy_cli/data.py, device_tf/datasets.py: TensorFlow's decoding and resizing,
 * labels from the sorted folder names, as `spliteasy train --data FOLDER`) writes a frames
 * file into a temporary directory, which train.mjs then reads like any data file.
 * The Python is $SPLITEASY_PYTHON, else the repository's .venv/bin/python, else python3.
 */
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

import { DeviceError } from './errors.mjs';

const REPO = resolve(dirname(fileURLToPath(import.meta.url)), '../../..');

function python() {
  if (process.env.SPLITEASY_PYTHON) return process.env.SPLITEASY_PYTHON;
  const venv = join(REPO, '.venv', 'bin', 'python');
  return existsSync(venv) ? venv : 'python3';
}

/**
 * The frames file to read for `path`: `path` itself when it is one, else the file
 * `spliteasy data` writes from the folder or .npz for the model at `where` (a bundle
 * directory or the server URL). Returns {file, record} (record: classes etc., or null).
 */
export async function dataFileFor(path, where, log = () => {}) {
  let isDir = false;
  try {
    isDir = (await stat(path)).isDirectory();
  } catch {
    return { file: path, record: null }; // readData names the missing file
  }
  if (!isDir && !path.toLowerCase().endsWith('.npz')) return { file: path, record: null };
  const out = join(await mkdtemp(join(tmpdir(), 'spliteasy-data-')), 'train.frames');
  const args = ['-m', 'spliteasy_cli.main', 'data', where, '--data', path, '--out', out];
  const env = { ...process.env, PYTHONPATH: [REPO, process.env.PYTHONPATH].filter(Boolean).join(':') };
  const proc = spawnSync(python(), args, { cwd: REPO, env, encoding: 'utf8' });
  if (proc.error) throw new DeviceError(`cannot run spliteasy data (${python()}) to decode ${path}: ${proc.error.message}`);
  if (proc.status !== 0) {
    const why = (proc.stderr || proc.stdout || '').trim().split('\n').at(-1) ?? '';
    throw new DeviceError(why.replace(/^spliteasy data: error: /, '') || `spliteasy data failed on ${path}`);
  }
  const record = JSON.parse(proc.stdout.trim().split('\n').at(-1));
  const classes = record.class_names ? `, ${record.class_names.length} classes (${record.class_names.join(', ')})` : '';
  log(`data ${path}: ${record.n_train} samples${classes}, decoded by spliteasy data`);
  return { file: out, record };
}
