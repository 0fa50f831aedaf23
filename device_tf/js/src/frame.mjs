/**
 * The binary tensor frame, byte for byte the format of shared_schema/frame.py:
 *
 *   0  4  magic "SPLT"        12 16 session id
 *   4  1  version (1)         28  8 step (uint64)
 *   5  1  kind                36  8 payload length (uint64)
 *   6  1  dtype               44  . name (UTF-8), ndim x uint32 dims, payload
 *   7  1  layout
 *   8  1  ndim (<= 8)
 *   9  1  flags (codec flag)
 *   10 2  name length (<= 200)
 *
 * All integers little-endian. Decoding trusts nothing: every length is checked before it
 * is used and the payload must be exactly dtype size x prod(shape). Unlike the Python
 * codec, decoded payloads are copied: a typed array cannot view a float32 payload at an
 * offset that is not a multiple of 4, and the name makes most offsets odd.
 *
 * Compression (codec.mjs): a float32 ACTIVATION or GRADIENT frame may travel encoded by
 * its session's codec: dtype float32 and the logical shape in the header, the codec's flag
 * in the flags byte, the encoded payload (its length must be what the codec needs). It
 * decodes to a Float32Array with `codec` naming the codec it came in.
 */

import {
  BadMagic,
  FrameSizeMismatch,
  FrameSpecMismatch,
  TruncatedFrame,
  UnsupportedVersion,
} from './errors.mjs';
import {
  CODECS,
  CODEC_NAMES,
  codecFlag,
  codecOfFlag,
  compress,
  compressible,
  decompress,
  frameSeed,
  payloadSize,
} from './codec.mjs';

export const MAGIC = new Uint8Array([0x53, 0x50, 0x4c, 0x54]); // "SPLT"
export const VERSION = 1;
export const MEDIA_TYPE = 'application/x-spliteasy-frames';
export const MAX_NDIM = 8;
export const MAX_NAME = 200;
export const HEADER_SIZE = 44;
export const NO_SESSION = new Uint8Array(16);

export const FrameKind = Object.freeze({
  ACTIVATION: 1, // forward: a cut tensor's values
  GRADIENT: 2, // backward: dL/d(cut tensor)
  TARGET: 3, // backward, auxiliary-label form: c_hat = c - dL/dc
  LABELS: 4, // single split: the labels travel up
  SCALAR: 5, // metrics (loss) riding along a reply
});
const KIND_NAMES = Object.fromEntries(Object.entries(FrameKind).map(([k, v]) => [v, k]));

export const DTYPES = Object.freeze({ 1: 'float32', 2: 'float16', 3: 'int32', 4: 'int64', 5: 'uint8' });
const DTYPE_CODES = Object.fromEntries(Object.entries(DTYPES).map(([k, v]) => [v, Number(k)]));
// float16 has no typed array in Node 20: its payload stays raw bits in a Uint16Array.
const ARRAYS = {
  float32: Float32Array,
  float16: Uint16Array,
  int32: Int32Array,
  int64: BigInt64Array,
  uint8: Uint8Array,
};
export const LAYOUTS = Object.freeze({ 0: 'N', 1: 'NC', 2: 'NHWC', 3: 'NCHW', 4: 'scalar', 5: 'NWC' });
const LAYOUT_CODES = Object.fromEntries(Object.entries(LAYOUTS).map(([k, v]) => [v, Number(k)]));

if (new Uint8Array(new Uint16Array([1]).buffer)[0] !== 1) {
  // Typed arrays use the host's byte order; the wire is little-endian.
  throw new Error('spliteasy frames need a little-endian host');
}

const utf8 = new TextEncoder();
const utf8Strict = new TextDecoder('utf-8', { fatal: true });

/**
 * A frame: one tensor with its wire metadata.
 * @typedef {{kind: number, name: string, dtype: string, shape: number[], data: ArrayBufferView,
 *            layout: string, session: Uint8Array, step: number, codec: string}} Frame
 */

/**
 * Build a frame; `data` is a typed array matching `dtype`, C order. `codec` (codec.mjs):
 * how a float32 ACTIVATION/GRADIENT frame's payload travels (default float32, raw).
 */
export function frame(kind, name, data, shape, layout, { session = NO_SESSION, step = 0, dtype, codec = 'float32' } = {}) {
  const dt = dtype ?? dtypeOf(data);
  return { kind, name, dtype: dt, shape: [...shape], data, layout, session, step, codec };
}

export function scalar(name, value, { session = NO_SESSION, step = 0 } = {}) {
  return frame(FrameKind.SCALAR, name, new Float32Array([value]), [], 'scalar', { session, step });
}

function dtypeOf(data) {
  for (const [name, Ctor] of Object.entries(ARRAYS)) {
    if (name !== 'float16' && data instanceof Ctor) return name;
  }
  throw new FrameSpecMismatch(`cannot frame a ${data?.constructor?.name ?? typeof data}`);
}

function numel(shape) {
  return shape.reduce((a, b) => a * b, 1);
}

/** Frames to one message body (Uint8Array). */
export function encode(frames) {
  const parts = [];
  let total = 0;
  for (const f of frames) {
    const code = DTYPE_CODES[f.dtype];
    if (code === undefined) throw new FrameSpecMismatch(`${f.name}: dtype ${f.dtype} cannot be framed`);
    const Ctor = ARRAYS[f.dtype];
    if (!(f.data instanceof Ctor)) {
      throw new FrameSpecMismatch(`${f.name}: dtype ${f.dtype} needs a ${Ctor.name}`);
    }
    const layout = LAYOUT_CODES[f.layout];
    if (layout === undefined) throw new FrameSpecMismatch(`${f.name}: unknown layout ${f.layout}`);
    if (KIND_NAMES[f.kind] === undefined) throw new FrameSpecMismatch(`${f.name}: unknown frame kind ${f.kind}`);
    const name = utf8.encode(f.name);
    if (name.length > MAX_NAME) throw new FrameSpecMismatch(`tensor name longer than ${MAX_NAME} bytes`);
    if (f.shape.length > MAX_NDIM) throw new FrameSpecMismatch(`${f.name}: rank ${f.shape.length} exceeds ${MAX_NDIM}`);
    if (!f.shape.every((d) => Number.isInteger(d) && d >= 0 && d <= 0xffffffff)) {
      throw new FrameSpecMismatch(`${f.name}: bad shape ${JSON.stringify(f.shape)}`);
    }
    if (f.data.length !== numel(f.shape)) {
      throw new FrameSizeMismatch(`${f.name}: ${f.data.length} values for shape ${JSON.stringify(f.shape)}`);
    }
    const session = f.session ?? NO_SESSION;
    if (session.length !== 16) throw new FrameSpecMismatch('session id must be 16 bytes');
    if (!Number.isSafeInteger(f.step) || f.step < 0) throw new FrameSpecMismatch(`bad step ${f.step}`);
    const codec = f.codec ?? 'float32';
    const flag = codecFlag(codec);
    let payload = new Uint8Array(f.data.buffer, f.data.byteOffset, f.data.byteLength);
    if (flag !== 0) {
      if (!compressible(KIND_NAMES[f.kind], f.dtype)) {
        throw new FrameSpecMismatch(`${f.name}: a ${KIND_NAMES[f.kind]} ${f.dtype} frame travels raw, not as ${codec}`);
      }
      payload = compress(codec, f.data, f.shape, f.layout, frameSeed(f.step, f.kind));
    }
    const meta = new Uint8Array(HEADER_SIZE + name.length + 4 * f.shape.length);
    const dv = new DataView(meta.buffer);
    meta.set(MAGIC, 0);
    dv.setUint8(4, VERSION);
    dv.setUint8(5, f.kind);
    dv.setUint8(6, code);
    dv.setUint8(7, layout);
    dv.setUint8(8, f.shape.length);
    dv.setUint8(9, flag);
    dv.setUint16(10, name.length, true);
    meta.set(session, 12);
    dv.setBigUint64(28, BigInt(f.step), true);
    dv.setBigUint64(36, BigInt(payload.byteLength), true);
    meta.set(name, HEADER_SIZE);
    f.shape.forEach((d, i) => dv.setUint32(HEADER_SIZE + name.length + 4 * i, d, true));
    parts.push(meta, payload);
    total += meta.length + payload.length;
  }
  const out = new Uint8Array(total);
  let pos = 0;
  for (const p of parts) {
    out.set(p, pos);
    pos += p.length;
  }
  return out;
}

/**
 * One message body (ArrayBuffer or Uint8Array) to its frames; bad input throws a FrameError.
 * `codec`: the session's codec -- float32 ACTIVATION/GRADIENT frames must come in it, all
 * others raw (UnsupportedVersion otherwise); undefined accepts any known codec.
 * `maxElements`: the most elements a compressed frame may decode to.
 */
export function decode(buf, { codec, maxElements } = {}) {
  if (codec !== undefined) codecFlag(codec);
  const bytes = buf instanceof Uint8Array ? buf : new Uint8Array(buf);
  if (bytes.length === 0) throw new TruncatedFrame('empty message: expected at least one frame');
  const frames = [];
  let pos = 0;
  while (pos < bytes.length) {
    const [f, next] = decodeOne(bytes, pos, codec, maxElements);
    frames.push(f);
    pos = next;
  }
  return frames;
}

function decodeOne(bytes, pos, want, maxElements) {
  const left = bytes.length - pos;
  if (left < HEADER_SIZE) {
    const head = bytes.subarray(pos, pos + 4);
    if (!head.every((b, i) => b === MAGIC[i])) {
      throw new BadMagic(`bad magic at byte ${pos}: not a spliteasy frame`);
    }
    throw new TruncatedFrame(`frame at byte ${pos}: ${left} bytes, header needs ${HEADER_SIZE}`);
  }
  const dv = new DataView(bytes.buffer, bytes.byteOffset + pos, HEADER_SIZE);
  if (!MAGIC.every((b, i) => bytes[pos + i] === b)) {
    throw new BadMagic(`bad magic at byte ${pos}: not a spliteasy frame`);
  }
  const version = dv.getUint8(4);
  if (version !== VERSION) {
    throw new UnsupportedVersion(`frame version ${version}; this build speaks version ${VERSION}`);
  }
  const flags = dv.getUint8(9);
  const codec = codecOfFlag(flags);
  if (codec === undefined) {
    const known = CODEC_NAMES.map((c) => `${CODECS[c].flag} ${c}`).join(', ');
    throw new UnsupportedVersion(`frame flags 0x${flags.toString(16).padStart(2, '0')}: not a codec of version ${VERSION} (${known})`);
  }
  const kind = dv.getUint8(5);
  if (KIND_NAMES[kind] === undefined) throw new FrameSpecMismatch(`unknown frame kind ${kind}`);
  const dtypeCode = dv.getUint8(6);
  if (DTYPES[dtypeCode] === undefined) throw new FrameSpecMismatch(`unknown dtype code ${dtypeCode}`);
  const layoutCode = dv.getUint8(7);
  if (LAYOUTS[layoutCode] === undefined) throw new FrameSpecMismatch(`unknown layout code ${layoutCode}`);
  const ndim = dv.getUint8(8);
  const nameLen = dv.getUint16(10, true);
  if (ndim > MAX_NDIM || nameLen > MAX_NAME) {
    throw new FrameSpecMismatch(`frame header out of range (ndim=${ndim}, name length=${nameLen})`);
  }
  const session = bytes.slice(pos + 12, pos + 28);
  const step64 = dv.getBigUint64(28, true);
  const nbytes64 = dv.getBigUint64(36, true);
  pos += HEADER_SIZE;
  const meta = nameLen + 4 * ndim;
  if (bytes.length - pos < meta) {
    throw new TruncatedFrame(`frame header promises ${meta} bytes of name and shape; ${bytes.length - pos} left`);
  }
  let name;
  try {
    name = utf8Strict.decode(bytes.subarray(pos, pos + nameLen));
  } catch {
    throw new FrameSpecMismatch('tensor name is not UTF-8');
  }
  pos += nameLen;
  const sdv = new DataView(bytes.buffer, bytes.byteOffset + pos, 4 * ndim);
  const shape = Array.from({ length: ndim }, (_, i) => sdv.getUint32(4 * i, true));
  pos += 4 * ndim;
  const dtype = DTYPES[dtypeCode];
  const Ctor = ARRAYS[dtype];
  const fits = compressible(KIND_NAMES[kind], dtype);
  if (codec !== 'float32' && !fits) {
    throw new UnsupportedVersion(`${name}: a ${KIND_NAMES[kind]} ${dtype} frame travels raw (flags 0), not as ${codec}`);
  }
  if (want !== undefined && fits && codec !== want) {
    throw new UnsupportedVersion(`${name}: frame sent as ${codec}; this session negotiated codec ${want}`);
  }
  const count = shape.reduce((a, d) => a * BigInt(d), 1n);
  if (codec !== 'float32') {
    if (maxElements !== undefined && count > BigInt(maxElements)) {
      throw new FrameSizeMismatch(`${name}: ${codec} frame of ${count} elements; this receiver decodes at most ${maxElements}`);
    }
    const need = payloadSize(codec, shape, LAYOUTS[layoutCode]);
    if (nbytes64 !== need) {
      throw new FrameSizeMismatch(
        `${name}: header says ${nbytes64} payload bytes, ${codec} of ${dtype}[${shape.join(', ')}] needs ${need}`,
      );
    }
    const nbytes = Number(nbytes64);
    if (bytes.length - pos < nbytes) {
      throw new TruncatedFrame(`${name}: payload truncated (${bytes.length - pos} of ${nbytes} bytes)`);
    }
    if (step64 > BigInt(Number.MAX_SAFE_INTEGER)) throw new FrameSpecMismatch(`step ${step64} out of range`);
    const start = bytes.byteOffset + pos;
    const data = decompress(codec, new Uint8Array(bytes.buffer.slice(start, start + nbytes)), shape, LAYOUTS[layoutCode]);
    const f = { kind, name, dtype, shape, data, layout: LAYOUTS[layoutCode], session, step: Number(step64), codec };
    return [f, pos + nbytes];
  }
  const expected = BigInt(Ctor.BYTES_PER_ELEMENT) * count;
  if (nbytes64 !== expected) {
    throw new FrameSizeMismatch(
      `${name}: header says ${nbytes64} payload bytes, ${dtype}[${shape.join(', ')}] needs ${expected}`,
    );
  }
  const nbytes = Number(nbytes64);
  if (bytes.length - pos < nbytes) {
    throw new TruncatedFrame(`${name}: payload truncated (${bytes.length - pos} of ${nbytes} bytes)`);
  }
  if (step64 > BigInt(Number.MAX_SAFE_INTEGER)) throw new FrameSpecMismatch(`step ${step64} out of range`);
  const start = bytes.byteOffset + pos;
  const data = new Ctor(bytes.buffer.slice(start, start + nbytes));
  pos += nbytes;
  const f = { kind, name, dtype, shape, data, layout: LAYOUTS[layoutCode], session, step: Number(step64), codec };
  return [f, pos];
}

/**
 * Throw FrameSpecMismatch unless the frame is the tensor the manifest describes
 * (a TensorSpec: {name, shape: [null, ...], dtype, layout}).
 */
export function check(f, spec, kind = undefined) {
  if (kind !== undefined && f.kind !== kind) {
    throw new FrameSpecMismatch(`expected a ${KIND_NAMES[kind]} frame, got ${KIND_NAMES[f.kind]}`);
  }
  if (f.name !== spec.name) throw new FrameSpecMismatch(`expected tensor '${spec.name}', got '${f.name}'`);
  const dtype = spec.dtype ?? 'float32';
  if (f.dtype !== dtype) throw new FrameSpecMismatch(`${spec.name}: dtype ${f.dtype}, manifest says ${dtype}`);
  if (f.layout !== spec.layout) {
    throw new FrameSpecMismatch(`${spec.name}: layout ${f.layout}, manifest says ${spec.layout}`);
  }
  const sample = spec.shape.slice(1);
  const ok =
    f.shape.length === spec.shape.length && f.shape[0] >= 1 && sample.every((d, i) => f.shape[i + 1] === d);
  if (!ok) {
    throw new FrameSpecMismatch(
      `${spec.name}: shape [${f.shape.join(', ')}], manifest says [N, ${sample.join(', ')}]`,
    );
  }
}

export function kindName(kind) {
  return KIND_NAMES[kind] ?? `kind ${kind}`;
}

/** Session id as 32 lower-case hex digits <-> its 16 bytes. */
export function sessionBytes(hex) {
  if (!/^[0-9a-f]{32}$/.test(hex)) throw new FrameSpecMismatch(`session id ${hex} is not 32 hex digits`);
  return Uint8Array.from({ length: 16 }, (_, i) => parseInt(hex.slice(2 * i, 2 * i + 2), 16));
}

export function sessionHex(bytes) {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}
