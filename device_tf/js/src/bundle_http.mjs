/**
 * The device slices fetched from the server that trains B: GET /v1/manifest (the file's
 * exact bytes, whose sha256 opens the session) and GET /v1/bundle/<artefact>/<file> for
 * the TF.js slices. Every artefact is checked against the manifest's sha256 before use,
 * so a page trains exactly the slices the manifest names. Runs in a page and in Node.
 */

import { sha256Hex, treeDigest } from './digest.mjs';
import { ManifestError } from './errors.mjs';
import { artifactOf, deviceSlices, sliceOf, validateManifest } from './manifest.mjs';
import { loadLayersModel } from './slices.mjs';

/** Manifest from the server, validated against `schema`; returns {manifest, digest}. */
export async function fetchManifest(transport, schema) {
  const bytes = await transport.getBytes('/v1/manifest');
  const manifest = validateManifest(new TextDecoder().decode(bytes), schema, `${transport.baseUrl}/v1/manifest`);
  return { manifest, digest: await sha256Hex(bytes) };
}

const encodePath = (p) => p.split('/').map(encodeURIComponent).join('/');

export async function fetchTfjsArtifact(transport, artifact) {
  const base = `/v1/bundle/${encodePath(artifact.path)}`;
  const modelJsonBytes = await transport.getBytes(`${base}/model.json`);
  const modelJson = JSON.parse(new TextDecoder().decode(modelJsonBytes));
  const files = new Map([['model.json', modelJsonBytes]]);
  for (const group of modelJson.weightsManifest) {
    for (const p of group.paths) files.set(p, await transport.getBytes(`${base}/${encodePath(p)}`));
  }
  if ((await treeDigest(files)) !== artifact.sha256) {
    throw new ManifestError(`artefact ${artifact.path} from the server does not match its sha256`);
  }
  return { modelJson, readShard: async (p) => files.get(p) };
}

export async function fetchDeviceModels(transport, manifest) {
  const models = {};
  for (const name of deviceSlices(manifest)) {
    const art = artifactOf(sliceOf(manifest, name), 'tfjs_layers');
    const { modelJson, readShard } = await fetchTfjsArtifact(transport, art);
    models[name] = await loadLayersModel(modelJson, readShard);
  }
  return models;
}
