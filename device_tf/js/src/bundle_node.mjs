/**
 * Node side of bundle access: the manifest, its schema and the TF.js slices read from a
 * bundle directory on disk, every artefact the device uses checked against its sha256.
 */

import { readFile } from 'node:fs/promises';
import { join } from 'node:path';

import { treeDigest, sha256Hex } from './digest.mjs';
import { ManifestError } from './errors.mjs';
import { MANIFEST_FILE, artifactOf, deviceSlices, sliceOf, validateManifest } from './manifest.mjs';
import { loadLayersModel } from './slices.mjs';

/** The schema file the pydantic models export, in the repository this package lives in. */
export const SCHEMA_URL = new URL('../../../shared_schema/manifest.schema.json', import.meta.url);

export async function readSchema(path = SCHEMA_URL) {
  return JSON.parse(await readFile(path, 'utf8'));
}

/** Read, validate and hash-check a bundle's manifest; returns {manifest, digest}. */
export async function readManifest(bundleDir, schema) {
  const path = join(bundleDir, MANIFEST_FILE);
  let bytes;
  try {
    bytes = await readFile(path);
  } catch {
    throw new ManifestError(`${bundleDir} is not a spliteasy bundle: no ${MANIFEST_FILE}`);
  }
  const manifest = validateManifest(bytes.toString('utf8'), schema, path);
  return { manifest, digest: await sha256Hex(bytes) };
}

/** A tfjs_layers artefact's files (model.json + the shards it lists), hash-checked. */
export async function readTfjsArtifact(bundleDir, artifact) {
  const dir = join(bundleDir, artifact.path);
  let modelJsonBytes;
  try {
    modelJsonBytes = await readFile(join(dir, 'model.json'));
  } catch {
    throw new ManifestError(`artefact ${artifact.path} is missing (no model.json)`);
  }
  const modelJson = JSON.parse(modelJsonBytes.toString('utf8'));
  const files = new Map([['model.json', new Uint8Array(modelJsonBytes)]]);
  for (const group of modelJson.weightsManifest) {
    for (const p of group.paths) {
      try {
        files.set(p, new Uint8Array(await readFile(join(dir, p))));
      } catch {
        throw new ManifestError(`artefact ${artifact.path}: shard ${p} is missing`);
      }
    }
  }
  if ((await treeDigest(files)) !== artifact.sha256) {
    throw new ManifestError(`artefact ${artifact.path} does not match its sha256 (or holds other files)`);
  }
  return { modelJson, readShard: async (p) => files.get(p) };
}

/** Load the device slices (A, and C in a double split) of a validated manifest. */
export async function loadDeviceModels(bundleDir, manifest) {
  const models = {};
  for (const name of deviceSlices(manifest)) {
    const art = artifactOf(sliceOf(manifest, name), 'tfjs_layers');
    const { modelJson, readShard } = await readTfjsArtifact(bundleDir, art);
    models[name] = await loadLayersModel(modelJson, readShard);
  }
  return models;
}
