/**
 * SHA-256 the way shared_schema/manifest.py computes it, with WebCrypto so the same code
 * runs in Node 20 and in a page (crypto.subtle needs a secure context: https or loopback).
 */

const hex = (buf) => Array.from(new Uint8Array(buf), (b) => b.toString(16).padStart(2, '0')).join('');

export async function sha256Hex(bytes) {
  return hex(await globalThis.crypto.subtle.digest('SHA-256', bytes));
}

/** Python sorts pathlib paths part by part, not as strings ('a/b' < 'a-b'). */
function comparePaths(a, b) {
  const pa = a.split('/');
  const pb = b.split('/');
  for (let i = 0; i < Math.min(pa.length, pb.length); i++) {
    if (pa[i] !== pb[i]) return pa[i] < pb[i] ? -1 : 1;
  }
  return pa.length - pb.length;
}

/**
 * Hash of a directory: sha256 over (relative posix path, hex sha256 of the file) for each
 * file in sorted order -- shared_schema.manifest.sha256_tree.
 * @param {Map<string, Uint8Array>} files relative path -> bytes
 */
export async function treeDigest(files) {
  const enc = new TextEncoder();
  const parts = [];
  for (const rel of [...files.keys()].sort(comparePaths)) {
    parts.push(enc.encode(rel), enc.encode(await sha256Hex(files.get(rel))));
  }
  const all = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let pos = 0;
  for (const p of parts) {
    all.set(p, pos);
    pos += p.length;
  }
  return sha256Hex(all);
}
