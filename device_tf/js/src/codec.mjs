/**
 * Wire compression of cut tensors, byte for byte shared_schema/codec.py (the formats, the
 * rounding and why 4-bit rather than top-k are documented there and in docs/protocol.md,
 * "Compression"). A session asks for one codec when it opens; its float32 ACTIVATION and
 * GRADIENT frames then travel encoded, both ways: the frame header keeps dtype float32 and
 * the logical shape, the flags byte holds the codec's flag, the payload is:
 *
 *   float32       the float32 values                                        4n bytes
 *   fp16          IEEE binary16, nearest even, saturated at +-65504         2n
 *   bf16          top 16 bits of the float32, nearest even                  2n
 *   int8          lo f32, scale f32, n x u8 (per tensor)                    8 + n
 *   int8-channel  lo[C] f32, scale[C] f32, n x u8 (per channel)             8C + n
 *   int4          lo[C] f32, scale[C] f32, n x 4 bits (low nibble first)    8C + ceil(n/2)
 *
 * Affine: scale = f32((hi - lo) / L), q = clip(floor((x - lo) / scale + u), 0, L) (0 when
 * scale is 0), x' = f32(lo + q * scale); u = 0.5 (int8: nearest) or, for int4, stochastic
 * u_i = fmix32(i * 0x9E3779B1 + seed) / 2^32 with seed = frameSeed(step, kind) (unbiased):
 * double arithmetic on float32 inputs, uint32 hashing, one rounding,
 * the same IEEE operations numpy does, so both sides write the same bytes
 * (tests/golden/frames/codec/). The constants are protocol.json's "codecs" (asserted by
 * test/protocol.test.mjs).
 */

import { FrameSpecMismatch } from './errors.mjs';

export const DEFAULT_CODEC = 'float32';
export const COMPRESSIBLE_KINDS = Object.freeze(['ACTIVATION', 'GRADIENT']);
export const CHANNEL_AXIS = Object.freeze({ NHWC: 3, NCHW: 1, NC: 1, NWC: 2 });
export const CODECS = Object.freeze({
  float32: Object.freeze({ flag: 0, bits: 32, scales: null, levels: null, rounding: null }),
  fp16: Object.freeze({ flag: 1, bits: 16, scales: null, levels: null, rounding: null }),
  bf16: Object.freeze({ flag: 2, bits: 16, scales: null, levels: null, rounding: null }),
  int8: Object.freeze({ flag: 3, bits: 8, scales: 'tensor', levels: 255, rounding: 'nearest' }),
  'int8-channel': Object.freeze({ flag: 4, bits: 8, scales: 'channel', levels: 255, rounding: 'nearest' }),
  int4: Object.freeze({ flag: 5, bits: 4, scales: 'channel', levels: 15, rounding: 'stochastic' }),
});
export const CODEC_NAMES = Object.freeze(Object.keys(CODECS));
const BY_FLAG = Object.fromEntries(Object.entries(CODECS).map(([name, c]) => [c.flag, name]));
const FP16_MAX = 65504;

/** The codec's name for a flags byte, or undefined. */
export function codecOfFlag(flag) {
  return BY_FLAG[flag];
}

/** The flag of a codec name; an unknown name throws, naming the known ones. */
export function codecFlag(name) {
  const c = CODECS[name];
  if (c === undefined || !Object.hasOwn(CODECS, name)) {
    throw new FrameSpecMismatch(`unknown codec ${JSON.stringify(name)}; this build knows ${CODEC_NAMES.join(', ')}`);
  }
  return c.flag;
}

/** Whether a frame of this kind name and dtype travels in its session's codec. */
export function compressible(kindName, dtype) {
  return COMPRESSIBLE_KINDS.includes(kindName) && dtype === 'float32';
}

/** [axis, count] the scales run along ([null, 1] per tensor). */
export function channels(name, shape, layout) {
  const axis = CHANNEL_AXIS[layout];
  if (CODECS[name].scales !== 'channel' || axis === undefined || shape.length <= axis) return [null, 1];
  return [axis, shape[axis]];
}

/** Encoded payload bytes of a float32 tensor of this shape, as a BigInt (no overflow). */
export function payloadSize(name, shape, layout) {
  const c = CODECS[name];
  const n = shape.reduce((a, d) => a * BigInt(d), 1n);
  if (c.levels === null) return (n * BigInt(c.bits)) / 8n;
  const [, ch] = channels(name, shape, layout);
  return 8n * BigInt(ch) + (c.bits === 8 ? n : (n + 1n) / 2n);
}

/** float32 bits -> binary16 bits, round to nearest even (numpy's rule), saturated. */
function halfBits(bits) {
  const sign = (bits >>> 16) & 0x8000;
  const exp = (bits >>> 23) & 0xff;
  const mant = bits & 0x7fffff;
  if (exp === 0xff) {
    if (mant === 0) return sign | 0x7bff; // +-inf saturates, as numpy's clip does
    const h = 0x7c00 + (mant >>> 13);
    return sign | (h === 0x7c00 ? 0x7c01 : h); // NaN stays NaN
  }
  const e = exp - 112; // the binary16 exponent field
  if (e >= 31) return sign | 0x7bff;
  if (e <= 0) {
    if (e < -10) return sign; // below half the smallest subnormal: signed zero
    const m = mant | 0x800000;
    const shift = 14 - e;
    let h = m >>> shift;
    const rem = m & ((1 << shift) - 1);
    const half = 1 << (shift - 1);
    if (rem > half || (rem === half && h & 1)) h += 1;
    return sign | h;
  }
  let h = (e << 10) | (mant >>> 13);
  const rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && h & 1)) h += 1;
  if (h >= 0x7c00) h = 0x7bff; // only past 65504, which the clip excludes
  return sign | h;
}

function halfToFloat(h) {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >>> 10) & 0x1f;
  const mant = h & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 31) return mant ? NaN : sign * Infinity;
  return sign * (1 + mant / 1024) * 2 ** (exp - 15);
}

/** murmur3's 32-bit finaliser (uint32 in, uint32 out), as codec.py's _fmix32. */
function fmix32(h) {
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b);
  h ^= h >>> 13;
  h = Math.imul(h, 0xc2b2ae35);
  return (h ^ (h >>> 16)) >>> 0;
}

/** The stochastic-rounding seed of a frame: its step (up to 2^53) and kind, mixed to 32 bits. */
export function frameSeed(step, kind) {
  const hi = fmix32(Math.floor(step / 4294967296) >>> 0);
  return fmix32(((step >>> 0) ^ hi ^ Math.imul(kind, 0x27d4eb2f)) >>> 0);
}

/**
 * The payload of `data` (a Float32Array, C order, of `shape`) under codec `name`; `seed`
 * (frameSeed of the frame's step and kind) drives int4's stochastic rounding:
 * q = floor((x - lo) / scale + u_i), u_i = fmix32(i * 0x9E3779B1 + seed) / 2^32.
 */
export function compress(name, data, shape, layout, seed = 0) {
  codecFlag(name);
  const n = data.length;
  if (name === 'float32') return new Uint8Array(data.buffer.slice(data.byteOffset, data.byteOffset + data.byteLength));
  if (name === 'fp16' || name === 'bf16') {
    const out = new Uint16Array(n);
    const bits = new Uint32Array(data.buffer, data.byteOffset, n);
    if (name === 'fp16') {
      for (let i = 0; i < n; i++) {
        const v = data[i];
        out[i] = v > FP16_MAX ? 0x7bff : v < -FP16_MAX ? 0xfbff : halfBits(bits[i]);
      }
    } else {
      for (let i = 0; i < n; i++) {
        const u = bits[i];
        out[i] = Number.isNaN(data[i]) ? (u >>> 16) | 0x40 : Math.floor((u + 0x7fff + ((u >>> 16) & 1)) / 65536);
      }
    }
    return new Uint8Array(out.buffer);
  }
  const { levels, bits, rounding } = CODECS[name];
  const stochastic = rounding === 'stochastic';
  const [axis, ch] = channels(name, shape, layout);
  const inner = axis === null ? n : shape.slice(axis + 1).reduce((a, d) => a * d, 1);
  const outer = axis === null ? 1 : shape.slice(0, axis).reduce((a, d) => a * d, 1);
  const lo = new Float32Array(ch);
  const scale = new Float32Array(ch);
  const mins = new Float64Array(ch).fill(Infinity);
  const maxs = new Float64Array(ch).fill(-Infinity);
  for (let o = 0, i = 0; o < outer; o++) {
    for (let c = 0; c < ch; c++) {
      let mn = mins[c];
      let mx = maxs[c];
      for (let k = 0; k < inner; k++, i++) {
        const v = data[i];
        if (!Number.isFinite(v)) throw new FrameSpecMismatch(`a tensor with NaN or Inf cannot be sent with codec ${name}`);
        if (v < mn) mn = v;
        if (v > mx) mx = v;
      }
      mins[c] = mn;
      maxs[c] = mx;
    }
  }
  for (let c = 0; c < ch; c++) {
    if (mins[c] > maxs[c]) continue; // no elements: lo = scale = 0
    const l = mins[c] + 0; // -0 -> +0, as numpy's `+ 0` in codec.py (same bytes)
    lo[c] = l;
    scale[c] = Math.fround((maxs[c] + 0 - l) / levels);
  }
  const q = new Uint8Array(n);
  for (let o = 0, i = 0; o < outer; o++) {
    for (let c = 0; c < ch; c++) {
      const l = lo[c];
      const s = scale[c];
      for (let k = 0; k < inner; k++, i++) {
        if (s === 0) continue;
        const u = stochastic ? fmix32((Math.imul(i, 0x9e3779b1) + seed) >>> 0) / 4294967296 : 0.5;
        const v = Math.floor((data[i] - l) / s + u);
        q[i] = v < 0 ? 0 : v > levels ? levels : v;
      }
    }
  }
  const packed = bits === 4 ? new Uint8Array((n + 1) >> 1) : q;
  if (bits === 4) {
    for (let i = 0; i < n; i += 2) packed[i >> 1] = q[i] | ((i + 1 < n ? q[i + 1] : 0) << 4);
  }
  const out = new Uint8Array(8 * ch + packed.length);
  out.set(new Uint8Array(lo.buffer), 0);
  out.set(new Uint8Array(scale.buffer), 4 * ch);
  out.set(packed, 8 * ch);
  return out;
}

/**
 * The Float32Array a payload encodes. `payload` is a Uint8Array at offset 0 of its own
 * buffer (frame.mjs copies payloads out of the message) of exactly payloadSize bytes.
 */
export function decompress(name, payload, shape, layout) {
  codecFlag(name);
  const n = shape.reduce((a, d) => a * d, 1);
  const buf = payload.byteOffset === 0 ? payload.buffer : payload.slice().buffer;
  if (name === 'float32') return new Float32Array(buf, 0, n);
  if (name === 'fp16') {
    const h = new Uint16Array(buf, 0, n);
    const out = new Float32Array(n);
    for (let i = 0; i < n; i++) out[i] = halfToFloat(h[i]);
    return out;
  }
  if (name === 'bf16') {
    const h = new Uint16Array(buf, 0, n);
    const bits = new Uint32Array(n);
    for (let i = 0; i < n; i++) bits[i] = h[i] << 16;
    return new Float32Array(bits.buffer);
  }
  const { bits } = CODECS[name];
  const [axis, ch] = channels(name, shape, layout);
  const inner = axis === null ? n : shape.slice(axis + 1).reduce((a, d) => a * d, 1);
  const outer = axis === null ? 1 : shape.slice(0, axis).reduce((a, d) => a * d, 1);
  const lo = new Float32Array(buf, 0, ch);
  const scale = new Float32Array(buf, 4 * ch, ch);
  const raw = new Uint8Array(buf, 8 * ch);
  const out = new Float32Array(n);
  for (let o = 0, i = 0; o < outer; o++) {
    for (let c = 0; c < ch; c++) {
      const l = lo[c];
      const s = scale[c];
      for (let k = 0; k < inner; k++, i++) {
        const q = bits === 4 ? (i & 1 ? raw[i >> 1] >> 4 : raw[i >> 1] & 0x0f) : raw[i];
        out[i] = l + q * s; // the Float32Array store rounds once, as numpy's astype
      }
    }
  }
  return out;
}
