/**
 * The safetensors format, written and read by hand (Node and browser alike).
 *
 *   8 bytes   N, the header length, unsigned little-endian
 *   N bytes   JSON {"<name>": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]},
 *                   "__metadata__": {"<key>": "<string>"}}, padded with spaces to 8 bytes
 *   rest      the tensors' raw little-endian bytes, back to back, offsets relative to here
 *
 * The device state (slices.safetensors, optimizer.safetensors) is read back by Python's
 * `safetensors` (spliteasy export, the tests), so the writer follows what that library's
 * loader checks: offsets contiguous from 0 and covering the whole data, byte counts equal
 * to shape x item size. The reader applies the same checks, so a torn or foreign file is an
 * error naming the problem, never a silently wrong tensor. No npm package for the format is
 * kept to a standard worth a dependency for ~100 lines (see README).
 */

import { DeviceError } from './errors.mjs';

/** dtype name -> TypedArray constructor (the dtypes spliteasy's device state uses). */
export const DTYPES = {
  F64: Float64Array,
  F32: Float32Array,
  I64: BigInt64Array,
  I32: Int32Array,
  I16: Int16Array,
  U8: Uint8Array,
  I8: Int8Array,
};

const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

function dtypeOf(data) {
  for (const [name, Ctor] of Object.entries(DTYPES)) if (data instanceof Ctor) return name;
  throw new DeviceError(`safetensors: unsupported array type ${data?.constructor?.name}`);
}

const count = (shape) => shape.reduce((a, b) => a * b, 1);

/**
 * Encode tensors as one safetensors file.
 * @param tensors Map or object: name -> {shape: number[], data: TypedArray} (dtype from the
 *   array type, or `dtype` given explicitly and checked); kept in insertion order
 * @param metadata optional {string: string}
 * @returns Uint8Array
 */
export function encodeSafetensors(tensors, metadata = undefined) {
  if (!LITTLE_ENDIAN) throw new DeviceError('safetensors: a big-endian host is not supported');
  const entries = tensors instanceof Map ? [...tensors.entries()] : Object.entries(tensors);
  const header = {};
  if (metadata && Object.keys(metadata).length) {
    for (const [k, v] of Object.entries(metadata)) {
      if (typeof v !== 'string') throw new DeviceError(`safetensors: metadata ${k} must be a string`);
    }
    header.__metadata__ = metadata;
  }
  let offset = 0;
  const parts = [];
  for (const [name, t] of entries) {
    if (name === '__metadata__') throw new DeviceError('safetensors: "__metadata__" is not a tensor name');
    const dtype = dtypeOf(t.data);
    if (t.dtype !== undefined && t.dtype !== dtype) {
      throw new DeviceError(`safetensors: ${name} is declared ${t.dtype} but holds ${dtype}`);
    }
    const shape = Array.from(t.shape);
    if (!shape.every((d) => Number.isInteger(d) && d >= 0) || count(shape) !== t.data.length) {
      throw new DeviceError(`safetensors: ${name} has ${t.data.length} values, not shape [${shape}]`);
    }
    const bytes = new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength);
    header[name] = { dtype, shape, data_offsets: [offset, offset + bytes.length] };
    parts.push(bytes);
    offset += bytes.length;
  }
  let json = new TextEncoder().encode(JSON.stringify(header));
  const padded = Math.ceil(json.length / 8) * 8;
  const out = new Uint8Array(8 + padded + offset);
  new DataView(out.buffer).setBigUint64(0, BigInt(padded), true);
  out.set(json, 8);
  out.fill(0x20, 8 + json.length, 8 + padded);
  json = null;
  let pos = 8 + padded;
  for (const p of parts) {
    out.set(p, pos);
    pos += p.length;
  }
  return out;
}

/**
 * Decode a safetensors file: {tensors: Map name -> {dtype, shape, data}, metadata}.
 * The arrays are copies (aligned), in the file's offset order.
 */
export function decodeSafetensors(bytes, what = 'safetensors file') {
  if (!LITTLE_ENDIAN) throw new DeviceError('safetensors: a big-endian host is not supported');
  const buf = bytes instanceof Uint8Array ? bytes : new Uint8Array(bytes);
  const fail = (why) => {
    throw new DeviceError(`${what}: ${why}`);
  };
  if (buf.length < 8) fail(`${buf.length} bytes, shorter than the 8-byte header length`);
  const n = new DataView(buf.buffer, buf.byteOffset, 8).getBigUint64(0, true);
  if (n > BigInt(buf.length - 8)) fail(`header of ${n} bytes in a file of ${buf.length}`);
  const headerEnd = 8 + Number(n);
  let header;
  try {
    header = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(buf.subarray(8, headerEnd)));
  } catch (err) {
    fail(`header is not JSON (${err.message})`);
  }
  if (header === null || typeof header !== 'object' || Array.isArray(header)) fail('header is not a JSON object');
  const metadata = header.__metadata__ ?? null;
  const dataLength = buf.length - headerEnd;
  const found = [];
  for (const [name, spec] of Object.entries(header)) {
    if (name === '__metadata__') continue;
    const Ctor = DTYPES[spec?.dtype];
    if (!Ctor) fail(`${name}: unsupported dtype ${spec?.dtype}`);
    const { shape, data_offsets: off } = spec;
    if (!Array.isArray(shape) || !shape.every((d) => Number.isInteger(d) && d >= 0)) fail(`${name}: bad shape`);
    if (!Array.isArray(off) || off.length !== 2 || !off.every(Number.isInteger) || off[0] > off[1]) {
      fail(`${name}: bad data_offsets`);
    }
    if (off[1] - off[0] !== count(shape) * Ctor.BYTES_PER_ELEMENT) {
      fail(`${name}: ${off[1] - off[0]} bytes for shape [${shape}] of ${spec.dtype}`);
    }
    found.push({ name, dtype: spec.dtype, shape, off, Ctor });
  }
  found.sort((a, b) => a.off[0] - b.off[0] || a.off[1] - b.off[1]);
  let expectStart = 0;
  for (const t of found) {
    if (t.off[0] !== expectStart) fail(`${t.name}: data does not follow the previous tensor (offset ${t.off[0]})`);
    expectStart = t.off[1];
  }
  if (expectStart !== dataLength) fail(`tensors cover ${expectStart} of ${dataLength} data bytes`);
  const tensors = new Map();
  for (const t of found) {
    const raw = buf.slice(headerEnd + t.off[0], headerEnd + t.off[1]); // a copy: aligned
    tensors.set(t.name, { dtype: t.dtype, shape: t.shape, data: new t.Ctor(raw.buffer) });
  }
  return { tensors, metadata };
}
