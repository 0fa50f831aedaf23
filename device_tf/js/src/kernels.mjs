/**
 * Fast float32 kernels for TF.js' cpu backend (tfjs-backend-cpu 4.22), registered over the
 * backend's own through TF.js' kernel registry (issue #12).
 *
 * Why: the cpu backend writes its convolution gradients as one dot product per output entry
 * through TensorBuffer.get (an index computation and bounds check per multiply-add), so the
 * filter gradient of ResNet's 7x7/2 stem convolution at 128 px, batch 16, took ~90x its own
 * forward (185 s against 2 s), and max-pooling's gradient and every reduction over leading
 * axes (BatchNormalization's moments and the sums that undo its broadcasts) went through
 * per-element index arithmetic too. Every convolutional slice A paid that on every step.
 *
 * How: convolutions become im2col + a register-tiled matrix product (gemmNT below: C = A B^T
 * with both operands contiguous along the shared axis, 4x4 accumulators), chunked over output
 * positions so the patch matrix stays in cache; gradients w.r.t. the filter accumulate in
 * float64, so their error is float32 rounding of the exact sum (TensorFlow's Eigen kernels
 * accumulate in float32: these results are at least as close to the exact gradient).
 * Reductions and transposes walk memory in order with counters instead of per-element
 * index conversions. Max pooling's gradient routes each dy to the first maximal input of
 * its window, as the backend's own (and TensorFlow's) does.
 *
 * Only NHWC float32 without dilation is handled here (the layouts Keras' zoo networks use);
 * any other call goes to the backend's original kernel, saved at registration.
 */

import * as tf from '@tensorflow/tfjs';

import { GEMM_WASM_BASE64 } from './gemm_wasm.mjs';

const { backend_util: bu } = tf;

/**
 * The WebAssembly SIMD matrix product (src/wasm/gemm.wat): f32x4 lanes, a 4x8 register
 * tile, ~5-8x the scalar gemmNT below in V8. Instantiated on first use; where WebAssembly
 * SIMD is missing (or `SPLITEASY_NO_WASM=1` in Node) the scalar path runs instead. Both
 * Node and a page run the same binary, so the cpu backend's numbers stay the same in both.
 */
let wasmGemm;

function simdGemm() {
  if (wasmGemm !== undefined) return wasmGemm;
  wasmGemm = null;
  if (globalThis.process?.env?.SPLITEASY_NO_WASM === '1' || typeof WebAssembly === 'undefined') return null;
  try {
    const bytes = Uint8Array.from(atob(GEMM_WASM_BASE64), (ch) => ch.charCodeAt(0));
    const { exports } = new WebAssembly.Instance(new WebAssembly.Module(bytes), {});
    wasmGemm = { memory: exports.memory, gemm: exports.gemm };
  } catch {
    wasmGemm = null; // no SIMD (an old engine): the scalar kernels below
  }
  return wasmGemm;
}

/** Whether the convolutions run on the WebAssembly SIMD product (for reports). */
export function usesSimd() {
  return simdGemm() !== null;
}

/**
 * Float32Array views of consecutive blocks of the WebAssembly memory, each 16-byte aligned,
 * of the given float counts (the memory grows as needed; views are made after growing).
 * Returns [{off, view}, ...] with `off` the block's byte offset for gemm().
 */
function wasmBlocks(w, ...sizes) {
  const offs = [];
  let end = 0;
  for (const n of sizes) {
    offs.push(end);
    end += Math.ceil((n * 4) / 16) * 16;
  }
  const have = w.memory.buffer.byteLength;
  if (end > have) w.memory.grow(Math.ceil((end - have) / 65536));
  return offs.map((off, i) => ({ off, view: new Float32Array(w.memory.buffer, off, sizes[i]) }));
}

const up4 = (n) => (n + 3) & ~3;
const up8 = (n) => (n + 7) & ~7;

/**
 * Recycled output arrays (issue #12). Every op of a step allocates its output (a ResNet50
 * stem activation at 96 px, batch 16: 9.4 MB), and V8 frees large ArrayBuffers only in full
 * garbage collections, which then took about half of a step's wall time. The arrays this
 * module allocates for its outputs go back to a pool, by length, when TF.js disposes their
 * tensor -- unless anything else may still see them: an array read outside these kernels
 * (dataSync()/data() hand out the backend's own array; TF.js' own kernels may keep views of
 * their inputs, e.g. a contiguous slice) is marked escaped and never reused. Inside these
 * kernels (`inFast`) reads do not mark: they keep no reference past the call.
 */
const POOL_MIN = 1 << 14; // floats; smaller arrays are cheap to collect
const POOL_MAX_BYTES = 256 << 20;
const pool = new Map(); // length -> [Float32Array]
let pooledBytes = 0;
const ours = new WeakSet();
const escaped = new WeakSet();
let inFast = 0;

/** A Float32Array of n floats for a kernel's output: recycled if one is free (zeroed if `zero`). */
function out32(n, zero = true) {
  if (n < POOL_MIN) return new Float32Array(n);
  const free = pool.get(n);
  if (free?.length) {
    const a = free.pop();
    pooledBytes -= a.byteLength;
    if (zero) a.fill(0);
    return a;
  }
  const a = new Float32Array(n);
  ours.add(a);
  return a;
}

/** f run as one of these kernels: its reads of TF.js data do not mark arrays escaped. */
function fastly(f) {
  return (...args) => {
    inFast += 1;
    try {
      return f(...args);
    } finally {
      inFast -= 1;
    }
  };
}

/** A backend's own kernel, called from one of these: its reads do mark (it may keep views). */
function callOriginal(name, args) {
  const saved = inFast;
  inFast = 0;
  try {
    return originals.get(name).kernelFunc(args);
  } finally {
    inFast = saved;
  }
}

/**
 * Hook the array pool into a cpu backend instance (backend.mjs, after setBackend('cpu')):
 * its data storage's get() marks escaped arrays, its disposeData() returns ours to the pool.
 */
export function installArrayPool(backend) {
  if (!backend?.data || backend.spliteasyPool) return;
  backend.spliteasyPool = true;
  const store = backend.data;
  const get = store.get.bind(store);
  store.get = (dataId) => {
    const d = get(dataId);
    if (!inFast && d?.values && ours.has(d.values)) escaped.add(d.values);
    return d;
  };
  const dispose = backend.disposeData.bind(backend);
  backend.disposeData = (dataId, force) => {
    inFast += 1;
    try {
      const values = store.has(dataId) ? get(dataId).values : null;
      const done = dispose(dataId, force);
      if (values && !store.has(dataId) && ours.has(values) && !escaped.has(values)) {
        if (pooledBytes + values.byteLength <= POOL_MAX_BYTES) {
          if (!pool.has(values.length)) pool.set(values.length, []);
          pool.get(values.length).push(values);
          pooledBytes += values.byteLength;
        }
      }
      return done;
    } finally {
      inFast -= 1;
    }
  };
}

/** Rows of output positions per wasm block: about 256 KiB of patch matrix, a multiple of 4. */
function wasmChunk(k) {
  return Math.max(4, Math.min(1024, Math.floor(65536 / Math.max(k, 1)))) & ~3;
}

/** The backend's original kernels, by name (fallbacks for what is not handled here). */
const originals = new Map();

/** Chunk of output positions per im2col block: patch rows of K floats each. */
function chunkFor(k) {
  return Math.max(8, Math.min(256, Math.floor(65536 / Math.max(k, 1)))) & ~3;
}

/**
 * C[i*ldc + j] (+)= sum_k A[aOff + i*lda + k] * B[bOff + j*ldb + k] for i < m, j < n.
 * Sums are taken in float64 (JS arithmetic) and stored into C (float64 or float32).
 */
export function gemmNT(A, aOff, lda, B, bOff, ldb, C, cOff, ldc, m, n, k, accumulate) {
  let i = 0;
  // 4x4 tiles: 16 float64 accumulators, 8 loads per 16 multiply-adds.
  for (; i + 3 < m; i += 4) {
    const a0 = aOff + i * lda;
    const a1 = a0 + lda;
    const a2 = a1 + lda;
    const a3 = a2 + lda;
    let j = 0;
    for (; j + 3 < n; j += 4) {
      const b0 = bOff + j * ldb;
      const b1 = b0 + ldb;
      const b2 = b1 + ldb;
      const b3 = b2 + ldb;
      let s00 = 0, s01 = 0, s02 = 0, s03 = 0, s10 = 0, s11 = 0, s12 = 0, s13 = 0;
      let s20 = 0, s21 = 0, s22 = 0, s23 = 0, s30 = 0, s31 = 0, s32 = 0, s33 = 0;
      for (let p = 0; p < k; p++) {
        const y0 = B[b0 + p];
        const y1 = B[b1 + p];
        const y2 = B[b2 + p];
        const y3 = B[b3 + p];
        let x = A[a0 + p];
        s00 += x * y0; s01 += x * y1; s02 += x * y2; s03 += x * y3;
        x = A[a1 + p];
        s10 += x * y0; s11 += x * y1; s12 += x * y2; s13 += x * y3;
        x = A[a2 + p];
        s20 += x * y0; s21 += x * y1; s22 += x * y2; s23 += x * y3;
        x = A[a3 + p];
        s30 += x * y0; s31 += x * y1; s32 += x * y2; s33 += x * y3;
      }
      const c0 = cOff + i * ldc + j;
      const c1 = c0 + ldc;
      const c2 = c1 + ldc;
      const c3 = c2 + ldc;
      if (accumulate) {
        C[c0] += s00; C[c0 + 1] += s01; C[c0 + 2] += s02; C[c0 + 3] += s03;
        C[c1] += s10; C[c1 + 1] += s11; C[c1 + 2] += s12; C[c1 + 3] += s13;
        C[c2] += s20; C[c2 + 1] += s21; C[c2 + 2] += s22; C[c2 + 3] += s23;
        C[c3] += s30; C[c3 + 1] += s31; C[c3 + 2] += s32; C[c3 + 3] += s33;
      } else {
        C[c0] = s00; C[c0 + 1] = s01; C[c0 + 2] = s02; C[c0 + 3] = s03;
        C[c1] = s10; C[c1 + 1] = s11; C[c1 + 2] = s12; C[c1 + 3] = s13;
        C[c2] = s20; C[c2 + 1] = s21; C[c2 + 2] = s22; C[c2 + 3] = s23;
        C[c3] = s30; C[c3 + 1] = s31; C[c3 + 2] = s32; C[c3 + 3] = s33;
      }
    }
    for (; j < n; j++) {
      const b0 = bOff + j * ldb;
      let s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      for (let p = 0; p < k; p++) {
        const y = B[b0 + p];
        s0 += A[a0 + p] * y;
        s1 += A[a1 + p] * y;
        s2 += A[a2 + p] * y;
        s3 += A[a3 + p] * y;
      }
      const c0 = cOff + i * ldc + j;
      if (accumulate) {
        C[c0] += s0; C[c0 + ldc] += s1; C[c0 + 2 * ldc] += s2; C[c0 + 3 * ldc] += s3;
      } else {
        C[c0] = s0; C[c0 + ldc] = s1; C[c0 + 2 * ldc] = s2; C[c0 + 3 * ldc] = s3;
      }
    }
  }
  for (; i < m; i++) {
    const a0 = aOff + i * lda;
    const c0 = cOff + i * ldc;
    for (let j = 0; j < n; j++) {
      const b0 = bOff + j * ldb;
      let s = 0;
      for (let p = 0; p < k; p++) s += A[a0 + p] * B[b0 + p];
      if (accumulate) C[c0 + j] += s;
      else C[c0 + j] = s;
    }
  }
}

/** The geometry of an NHWC, undilated 2-D convolution, or null for anything else. */
function convGeometry(xShape, filterShape, strides, pad, dimRoundingMode, dataFormat, dilations, depthwise = false) {
  if (dataFormat && dataFormat !== 'NHWC' && dataFormat !== 'channelsLast') return null;
  const d = dilations == null ? [1, 1] : typeof dilations === 'number' ? [dilations, dilations] : dilations;
  if (d[0] !== 1 || d[1] !== 1) return null;
  const info = bu.computeConv2DInfo(xShape, filterShape, strides, 1, pad, dimRoundingMode, depthwise, 'channelsLast');
  return {
    batch: info.batchSize,
    inH: info.inHeight,
    inW: info.inWidth,
    inC: info.inChannels,
    outH: info.outHeight,
    outW: info.outWidth,
    outC: info.outChannels,
    kH: info.filterHeight,
    kW: info.filterWidth,
    sH: info.strideHeight,
    sW: info.strideWidth,
    top: info.padInfo.top,
    left: info.padInfo.left,
    outShape: info.outShape,
    inShape: info.inShape,
    filterShape: info.filterShape,
  };
}

/**
 * Rows m0 .. m0+rows-1 of the patch matrix (output position m = (b*outH + oy)*outW + ox,
 * column (ky*kW + kx)*inC + c) into P (row-major, K columns); padding reads as 0.
 */
function im2col(x, g, m0, rows, P) {
  const { inH, inW, inC, outH, outW, kH, kW, sH, sW, top, left } = g;
  const K = kH * kW * inC;
  const hw = outH * outW;
  for (let r = 0; r < rows; r++) {
    const m = m0 + r;
    const b = (m / hw) | 0;
    const rem = m - b * hw;
    const oy = (rem / outW) | 0;
    const ox = rem - oy * outW;
    const iy0 = oy * sH - top;
    const ix0 = ox * sW - left;
    let p = r * K;
    for (let ky = 0; ky < kH; ky++) {
      const iy = iy0 + ky;
      if (iy < 0 || iy >= inH) {
        P.fill(0, p, p + kW * inC);
        p += kW * inC;
        continue;
      }
      const rowBase = (b * inH + iy) * inW;
      for (let kx = 0; kx < kW; kx++) {
        const ix = ix0 + kx;
        if (ix < 0 || ix >= inW) {
          P.fill(0, p, p + inC);
        } else {
          const s = (rowBase + ix) * inC;
          for (let c = 0; c < inC; c++) P[p + c] = x[s + c];
        }
        p += inC;
      }
    }
  }
}

/** Scatter-add of patch rows (the adjoint of im2col; row stride `ld`, default K) into dx. */
function col2im(dP, g, m0, rows, dx, ld = 0) {
  const { inH, inW, inC, outH, outW, kH, kW, sH, sW, top, left } = g;
  const K = ld || kH * kW * inC;
  const hw = outH * outW;
  for (let r = 0; r < rows; r++) {
    const m = m0 + r;
    const b = (m / hw) | 0;
    const rem = m - b * hw;
    const oy = (rem / outW) | 0;
    const ox = rem - oy * outW;
    const iy0 = oy * sH - top;
    const ix0 = ox * sW - left;
    let p = r * K;
    for (let ky = 0; ky < kH; ky++) {
      const iy = iy0 + ky;
      if (iy < 0 || iy >= inH) {
        p += kW * inC;
        continue;
      }
      const rowBase = (b * inH + iy) * inW;
      for (let kx = 0; kx < kW; kx++) {
        const ix = ix0 + kx;
        if (ix >= 0 && ix < inW) {
          const s = (rowBase + ix) * inC;
          for (let c = 0; c < inC; c++) dx[s + c] += dP[p + c];
        }
        p += inC;
      }
    }
  }
}

/** A 1x1, stride-1, unpadded convolution: the patch matrix is x itself. */
function isPointwise(g) {
  return g.kH === 1 && g.kW === 1 && g.sH === 1 && g.sW === 1 && g.top === 0 && g.left === 0;
}

/** y = conv(x, w) on the SIMD product: im2col blocks into wasm memory, C = P W. */
function conv2dForwardSimd(wg, x, w, g, bias) {
  const K = g.kH * g.kW * g.inC;
  const N = g.outC;
  const M = g.batch * g.outH * g.outW;
  const Np = up8(N);
  const chunk = wasmChunk(K);
  const [A, B, C] = wasmBlocks(wg, chunk * K, K * Np, chunk * Np);
  const Bv = B.view;
  Bv.fill(0);
  for (let k = 0; k < K; k++) Bv.set(w.subarray(k * N, (k + 1) * N), k * Np);
  const y = out32(M * N, false);
  const pointwise = isPointwise(g);
  const Cv = C.view;
  for (let m0 = 0; m0 < M; m0 += chunk) {
    const rows = Math.min(chunk, M - m0);
    const rowsP = up4(rows);
    if (pointwise) A.view.set(x.subarray(m0 * K, (m0 + rows) * K));
    else im2col(x, g, m0, rows, A.view);
    if (rowsP > rows) A.view.fill(0, rows * K, rowsP * K);
    wg.gemm(A.off, B.off, C.off, K, Np, Np, rowsP, Np, K);
    const base = m0 * N;
    if (bias) {
      const bl = bias.length;
      for (let r = 0; r < rows; r++) {
        const o = base + r * N;
        const c = r * Np;
        for (let n = 0; n < N; n++) y[o + n] = Cv[c + n] + bias[bl === 1 ? 0 : n];
      }
    } else if (Np === N) {
      y.set(Cv.subarray(0, rows * N), base);
    } else {
      for (let r = 0; r < rows; r++) y.set(Cv.subarray(r * Np, r * Np + N), base + r * N);
    }
  }
  return y;
}

/** y = conv(x, w) as float32 NHWC values; bias (length outC or 1) added before rounding. */
export function conv2dForward(x, w, g, bias = null) {
  const wg = simdGemm();
  if (wg) return conv2dForwardSimd(wg, x, w, g, bias);
  const K = g.kH * g.kW * g.inC;
  const N = g.outC;
  const M = g.batch * g.outH * g.outW;
  const wt = new Float32Array(N * K); // W^T: [outC, K]
  for (let k = 0; k < K; k++) for (let n = 0; n < N; n++) wt[n * K + k] = w[k * N + n];
  const y = new Float32Array(M * N);
  const chunk = chunkFor(K);
  const acc = new Float64Array(chunk * N);
  const pointwise = isPointwise(g);
  const P = pointwise ? null : new Float32Array(chunk * K);
  for (let m0 = 0; m0 < M; m0 += chunk) {
    const rows = Math.min(chunk, M - m0);
    if (pointwise) gemmNT(x, m0 * K, K, wt, 0, K, acc, 0, N, rows, N, K, false);
    else {
      im2col(x, g, m0, rows, P);
      gemmNT(P, 0, K, wt, 0, K, acc, 0, N, rows, N, K, false);
    }
    const base = m0 * N;
    if (bias) {
      const bl = bias.length;
      for (let i = 0; i < rows * N; i++) y[base + i] = acc[i] + bias[bl === 1 ? 0 : i % N];
    } else {
      for (let i = 0; i < rows * N; i++) y[base + i] = acc[i];
    }
  }
  return y;
}

/**
 * dL/dW = sum over blocks of positions of P^T dy on the SIMD product: float32 sums within a
 * block of <= 1024 positions, float64 across blocks.
 */
function conv2dFilterGradSimd(wg, x, dy, g) {
  const K = g.kH * g.kW * g.inC;
  const N = g.outC;
  const M = g.batch * g.outH * g.outW;
  const Kp = up4(K);
  const Np = up8(N);
  const chunk = wasmChunk(Math.max(K, N));
  const P = isPointwise(g) ? null : new Float32Array(chunk * K);
  const [A, B, C] = wasmBlocks(wg, Kp * chunk, chunk * Np, Kp * Np);
  const At = A.view;
  const Bv = B.view;
  const Cv = C.view;
  At.fill(0);
  Bv.fill(0);
  const dw = new Float64Array(K * N);
  for (let m0 = 0; m0 < M; m0 += chunk) {
    const rows = Math.min(chunk, M - m0);
    let src = x;
    let srcOff = m0 * K;
    if (P) {
      im2col(x, g, m0, rows, P);
      src = P;
      srcOff = 0;
    }
    // A = the patch block transposed: [K, rows] with row stride `chunk`.
    for (let r = 0; r < rows; r++) {
      const sr = srcOff + r * K;
      for (let k = 0; k < K; k++) At[k * chunk + r] = src[sr + k];
    }
    if (Np === N) Bv.set(dy.subarray(m0 * N, (m0 + rows) * N));
    else for (let r = 0; r < rows; r++) Bv.set(dy.subarray((m0 + r) * N, (m0 + r + 1) * N), r * Np);
    wg.gemm(A.off, B.off, C.off, chunk, Np, Np, Kp, Np, rows);
    for (let k = 0; k < K; k++) {
      const o = k * N;
      const c = k * Np;
      for (let n = 0; n < N; n++) dw[o + n] += Cv[c + n];
    }
  }
  return Float32Array.from(dw);
}

/** dL/dW = sum over positions of patch^T dy, accumulated in float64. */
export function conv2dFilterGrad(x, dy, g) {
  const wg = simdGemm();
  if (wg) return conv2dFilterGradSimd(wg, x, dy, g);
  const K = g.kH * g.kW * g.inC;
  const N = g.outC;
  const M = g.batch * g.outH * g.outW;
  const chunk = chunkFor(Math.max(K, N));
  const P = new Float32Array(chunk * K);
  const pt = new Float32Array(K * chunk); // patch chunk transposed: [K, rows]
  const dyt = new Float32Array(N * chunk); // dy chunk transposed: [N, rows]
  const dw = new Float64Array(K * N);
  const pointwise = isPointwise(g);
  for (let m0 = 0; m0 < M; m0 += chunk) {
    const rows = Math.min(chunk, M - m0);
    let src = P;
    let srcOff = 0;
    if (pointwise) {
      src = x;
      srcOff = m0 * K;
    } else im2col(x, g, m0, rows, P);
    for (let r = 0; r < rows; r++) {
      const s = srcOff + r * K;
      for (let k = 0; k < K; k++) pt[k * rows + r] = src[s + k];
      const d = (m0 + r) * N;
      for (let n = 0; n < N; n++) dyt[n * rows + r] = dy[d + n];
    }
    gemmNT(pt, 0, rows, dyt, 0, rows, dw, 0, N, K, N, rows, true);
  }
  return Float32Array.from(dw);
}

/** dL/dx = col2im(dy W^T) on the SIMD product; the scatter-add sums in float64. */
function conv2dInputGradSimd(wg, dy, w, g) {
  const K = g.kH * g.kW * g.inC;
  const N = g.outC;
  const M = g.batch * g.outH * g.outW;
  const Kp = up8(K);
  const chunk = wasmChunk(Math.max(K, N));
  const [A, B, C] = wasmBlocks(wg, chunk * N, N * Kp, chunk * Kp);
  const Bv = B.view;
  const Cv = C.view;
  Bv.fill(0);
  for (let k = 0; k < K; k++) for (let n = 0; n < N; n++) Bv[n * Kp + k] = w[k * N + n];
  const pointwise = isPointwise(g);
  const inSize = g.batch * g.inH * g.inW * g.inC;
  const dx = pointwise ? out32(inSize, false) : new Float64Array(inSize);
  for (let m0 = 0; m0 < M; m0 += chunk) {
    const rows = Math.min(chunk, M - m0);
    const rowsP = up4(rows);
    A.view.set(dy.subarray(m0 * N, (m0 + rows) * N));
    if (rowsP > rows) A.view.fill(0, rows * N, rowsP * N);
    wg.gemm(A.off, B.off, C.off, N, Kp, Kp, rowsP, Kp, N);
    if (pointwise) {
      if (Kp === K) dx.set(Cv.subarray(0, rows * K), m0 * K);
      else for (let r = 0; r < rows; r++) dx.set(Cv.subarray(r * Kp, r * Kp + K), (m0 + r) * K);
    } else col2im(Cv, g, m0, rows, dx, Kp);
  }
  if (pointwise) return dx;
  const out = out32(inSize, false);
  for (let i = 0; i < inSize; i++) out[i] = dx[i];
  return out;
}

/** dL/dx = col2im(dy W^T). */
export function conv2dInputGrad(dy, w, g) {
  const wg = simdGemm();
  if (wg) return conv2dInputGradSimd(wg, dy, w, g);
  const K = g.kH * g.kW * g.inC;
  const N = g.outC;
  const M = g.batch * g.outH * g.outW;
  const inSize = g.batch * g.inH * g.inW * g.inC;
  if (isPointwise(g)) {
    const dx = new Float32Array(inSize);
    const chunk = chunkFor(N);
    const acc = new Float64Array(chunk * K);
    for (let m0 = 0; m0 < M; m0 += chunk) {
      const rows = Math.min(chunk, M - m0);
      gemmNT(dy, m0 * N, N, w, 0, N, acc, 0, K, rows, K, N, false);
      const base = m0 * K;
      for (let i = 0; i < rows * K; i++) dx[base + i] = acc[i];
    }
    return dx;
  }
  const dx = new Float64Array(inSize);
  const chunk = chunkFor(Math.max(K, N));
  const dP = new Float64Array(chunk * K);
  for (let m0 = 0; m0 < M; m0 += chunk) {
    const rows = Math.min(chunk, M - m0);
    gemmNT(dy, m0 * N, N, w, 0, N, dP, 0, K, rows, K, N, false);
    col2im(dP, g, m0, rows, dx);
  }
  return Float32Array.from(dx);
}

/** Depthwise (channel multiplier 1) filter gradient: [kH, kW, C, 1], float64 sums. */
export function depthwiseFilterGrad(x, dy, g) {
  const { batch, inH, inW, inC: C, outH, outW, kH, kW, sH, sW, top, left } = g;
  const dw = new Float64Array(kH * kW * C);
  for (let b = 0; b < batch; b++) {
    for (let oy = 0; oy < outH; oy++) {
      for (let ox = 0; ox < outW; ox++) {
        const d = ((b * outH + oy) * outW + ox) * C;
        for (let ky = 0; ky < kH; ky++) {
          const iy = oy * sH - top + ky;
          if (iy < 0 || iy >= inH) continue;
          for (let kx = 0; kx < kW; kx++) {
            const ix = ox * sW - left + kx;
            if (ix < 0 || ix >= inW) continue;
            const s = ((b * inH + iy) * inW + ix) * C;
            const o = (ky * kW + kx) * C;
            for (let c = 0; c < C; c++) dw[o + c] += x[s + c] * dy[d + c];
          }
        }
      }
    }
  }
  return Float32Array.from(dw);
}

/** Depthwise (channel multiplier 1) input gradient. */
export function depthwiseInputGrad(dy, w, g) {
  const { batch, inH, inW, inC: C, outH, outW, kH, kW, sH, sW, top, left } = g;
  const dx = new Float64Array(batch * inH * inW * C);
  for (let b = 0; b < batch; b++) {
    for (let oy = 0; oy < outH; oy++) {
      for (let ox = 0; ox < outW; ox++) {
        const d = ((b * outH + oy) * outW + ox) * C;
        for (let ky = 0; ky < kH; ky++) {
          const iy = oy * sH - top + ky;
          if (iy < 0 || iy >= inH) continue;
          for (let kx = 0; kx < kW; kx++) {
            const ix = ox * sW - left + kx;
            if (ix < 0 || ix >= inW) continue;
            const s = ((b * inH + iy) * inW + ix) * C;
            const o = (ky * kW + kx) * C;
            for (let c = 0; c < C; c++) dx[s + c] += w[o + c] * dy[d + c];
          }
        }
      }
    }
  }
  return Float32Array.from(dx);
}

/** Depthwise (channel multiplier 1) forward. */
export function depthwiseForward(x, w, g) {
  const { batch, inH, inW, inC: C, outH, outW, kH, kW, sH, sW, top, left } = g;
  const y = out32(batch * outH * outW * C, false);
  const acc = new Float64Array(C);
  for (let b = 0; b < batch; b++) {
    for (let oy = 0; oy < outH; oy++) {
      for (let ox = 0; ox < outW; ox++) {
        acc.fill(0);
        for (let ky = 0; ky < kH; ky++) {
          const iy = oy * sH - top + ky;
          if (iy < 0 || iy >= inH) continue;
          for (let kx = 0; kx < kW; kx++) {
            const ix = ox * sW - left + kx;
            if (ix < 0 || ix >= inW) continue;
            const s = ((b * inH + iy) * inW + ix) * C;
            const o = (ky * kW + kx) * C;
            for (let c = 0; c < C; c++) acc[c] += x[s + c] * w[o + c];
          }
        }
        const d = ((b * outH + oy) * outW + ox) * C;
        for (let c = 0; c < C; c++) y[d + c] = acc[c];
      }
    }
  }
  return y;
}

/** Max pooling's gradient: each dy to the first maximal input of its window. */
export function maxPoolGrad(x, dy, info) {
  const { batchSize, inHeight: inH, inWidth: inW, inChannels: C, outHeight: outH, outWidth: outW } = info;
  const { strideHeight: sH, strideWidth: sW, filterHeight: kH, filterWidth: kW } = info;
  const top = info.padInfo.top;
  const left = info.padInfo.left;
  // float32 sums (at most ceil(k/s)^2 windows share an input), straight into the output: a
  // float64 copy of a ResNet stem's padded activation was 20 MB more per call to collect
  const dx = out32(batchSize * inH * inW * C, true);
  const best = new Float64Array(C);
  const where = new Int32Array(C);
  for (let b = 0; b < batchSize; b++) {
    for (let oy = 0; oy < outH; oy++) {
      for (let ox = 0; ox < outW; ox++) {
        best.fill(-Infinity);
        where.fill(-1);
        for (let ky = 0; ky < kH; ky++) {
          const iy = oy * sH - top + ky;
          if (iy < 0 || iy >= inH) continue;
          for (let kx = 0; kx < kW; kx++) {
            const ix = ox * sW - left + kx;
            if (ix < 0 || ix >= inW) continue;
            const s = ((b * inH + iy) * inW + ix) * C;
            for (let c = 0; c < C; c++) {
              const v = x[s + c];
              if (v > best[c]) {
                best[c] = v;
                where[c] = s + c;
              }
            }
          }
        }
        const d = ((b * outH + oy) * outW + ox) * C;
        for (let c = 0; c < C; c++) if (where[c] >= 0) dx[where[c]] += dy[d + c];
      }
    }
  }
  return dx;
}

/** Max pooling's forward, channels innermost (NaN never wins, as in the backend's own). */
export function maxPoolForward(x, info) {
  const { batchSize, inHeight: inH, inWidth: inW, inChannels: C, outHeight: outH, outWidth: outW } = info;
  const { strideHeight: sH, strideWidth: sW, filterHeight: kH, filterWidth: kW } = info;
  const top = info.padInfo.top;
  const left = info.padInfo.left;
  const y = out32(batchSize * outH * outW * C, false);
  const best = new Float64Array(C);
  for (let b = 0; b < batchSize; b++) {
    for (let oy = 0; oy < outH; oy++) {
      for (let ox = 0; ox < outW; ox++) {
        best.fill(-Infinity);
        for (let ky = 0; ky < kH; ky++) {
          const iy = oy * sH - top + ky;
          if (iy < 0 || iy >= inH) continue;
          for (let kx = 0; kx < kW; kx++) {
            const ix = ox * sW - left + kx;
            if (ix < 0 || ix >= inW) continue;
            const s = ((b * inH + iy) * inW + ix) * C;
            for (let c = 0; c < C; c++) if (x[s + c] > best[c]) best[c] = x[s + c];
          }
        }
        y.set(best, ((b * outH + oy) * outW + ox) * C);
      }
    }
  }
  return y;
}

/** Sum of float32 values over `axes` (any set), in float64, walking memory in order. */
export function reduceSum(x, shape, axes) {
  const rank = shape.length;
  const reduced = new Array(rank).fill(false);
  for (const a of axes) reduced[a] = true;
  // Output strides for kept axes (0 for reduced ones).
  const outStrides = new Array(rank).fill(0);
  let outSize = 1;
  for (let d = rank - 1; d >= 0; d--) {
    if (!reduced[d]) {
      outStrides[d] = outSize;
      outSize *= shape[d];
    }
  }
  const acc = new Float64Array(outSize);
  const inner = rank ? shape[rank - 1] : 1;
  const outer = inner ? x.length / inner : 0;
  const innerReduced = rank ? reduced[rank - 1] : true;
  const idx = new Array(Math.max(rank - 1, 0)).fill(0);
  let o = 0;
  let s = 0;
  for (let n = 0; n < outer; n++) {
    if (innerReduced) {
      let t = 0;
      for (let j = 0; j < inner; j++) t += x[s + j];
      acc[o] += t;
    } else {
      for (let j = 0; j < inner; j++) acc[o + j] += x[s + j];
    }
    s += inner;
    for (let d = rank - 2; d >= 0; d--) {
      idx[d]++;
      o += outStrides[d];
      if (idx[d] < shape[d]) break;
      o -= outStrides[d] * shape[d];
      idx[d] = 0;
    }
  }
  return acc;
}

/** x transposed by perm, walking the output in order. */
export function transpose(x, shape, perm, out) {
  const rank = shape.length;
  const strides = new Array(rank);
  let st = 1;
  for (let d = rank - 1; d >= 0; d--) {
    strides[d] = st;
    st *= shape[d];
  }
  const outShape = perm.map((p) => shape[p]);
  const inStr = perm.map((p) => strides[p]);
  const inner = outShape[rank - 1];
  const innerStride = inStr[rank - 1];
  const outer = inner ? out.length / inner : 0;
  const idx = new Array(rank - 1).fill(0);
  let base = 0;
  let o = 0;
  for (let n = 0; n < outer; n++) {
    for (let j = 0, s = base; j < inner; j++, s += innerStride) out[o++] = x[s];
    for (let d = rank - 2; d >= 0; d--) {
      idx[d]++;
      base += inStr[d];
      if (idx[d] < outShape[d]) break;
      base -= inStr[d] * outShape[d];
      idx[d] = 0;
    }
  }
  return out;
}

/** The inner loop of one binary op (one copy per op, so each stays monomorphic). */
function binaryRow(code, a, x, ai, b, y, bi, out, o, n) {
  switch (code) {
    case 0:
      for (let j = 0; j < n; j++, x += ai, y += bi) out[o + j] = a[x] + b[y];
      break;
    case 1:
      for (let j = 0; j < n; j++, x += ai, y += bi) out[o + j] = a[x] - b[y];
      break;
    case 2:
      for (let j = 0; j < n; j++, x += ai, y += bi) out[o + j] = a[x] * b[y];
      break;
    default:
      for (let j = 0; j < n; j++, x += ai, y += bi) out[o + j] = a[x] / b[y];
  }
}

/**
 * out = op(a, b) with numpy broadcasting (code: 0 add, 1 sub, 2 mul, 3 div), walking the
 * output in order with counters (the backend's broadcasting path converts every index to
 * coordinates and back, and its same-shape path calls the op through a closure).
 */
export function broadcastBinary(code, a, aShape, b, bShape, outShape, out) {
  const rank = outShape.length;
  if (rank === 0) {
    binaryRow(code, a, 0, 0, b, 0, 0, out, 0, 1);
    return out;
  }
  const stridesOf = (shape) => {
    const st = new Array(rank).fill(0);
    let acc = 1;
    for (let d = rank - 1, sd = shape.length - 1; d >= 0; d--, sd--) {
      if (sd >= 0 && shape[sd] !== 1) st[d] = acc;
      if (sd >= 0) acc *= shape[sd];
    }
    return st;
  };
  const as = stridesOf(aShape);
  const bs = stridesOf(bShape);
  const inner = outShape[rank - 1];
  const outer = inner ? out.length / inner : 0;
  const idx = new Array(rank - 1).fill(0);
  let pa = 0;
  let pb = 0;
  for (let n = 0, o = 0; n < outer; n++, o += inner) {
    binaryRow(code, a, pa, as[rank - 1], b, pb, bs[rank - 1], out, o, inner);
    for (let d = rank - 2; d >= 0; d--) {
      idx[d]++;
      pa += as[d];
      pb += bs[d];
      if (idx[d] < outShape[d]) break;
      pa -= as[d] * outShape[d];
      pb -= bs[d] * outShape[d];
      idx[d] = 0;
    }
  }
  return out;
}

/**
 * Copy the block of shape `size` at `srcBegin` in src (shape srcShape) to `dstBegin` in dst
 * (shape dstShape), row by row of the last axis (Slice and PadV2 both are such a copy).
 */
export function copyBlock(src, srcShape, srcBegin, dst, dstShape, dstBegin, size) {
  const rank = size.length;
  const stridesOf = (shape) => {
    const st = new Array(rank);
    let acc = 1;
    for (let d = rank - 1; d >= 0; d--) {
      st[d] = acc;
      acc *= shape[d];
    }
    return st;
  };
  const ss = stridesOf(srcShape);
  const ds = stridesOf(dstShape);
  const inner = size[rank - 1];
  let total = 1;
  for (const d of size) total *= d;
  if (total === 0) return dst;
  let ps = 0;
  let pd = 0;
  for (let d = 0; d < rank; d++) {
    ps += srcBegin[d] * ss[d];
    pd += dstBegin[d] * ds[d];
  }
  const idx = new Array(rank - 1).fill(0);
  for (let n = 0, rows = total / inner; n < rows; n++) {
    dst.set(src.subarray(ps, ps + inner), pd);
    for (let d = rank - 2; d >= 0; d--) {
      idx[d]++;
      ps += ss[d];
      pd += ds[d];
      if (idx[d] < size[d]) break;
      ps -= ss[d] * size[d];
      pd -= ds[d] * size[d];
      idx[d] = 0;
    }
  }
  return dst;
}

// ---- kernel functions (the registry's calling convention) ----

const vals = (backend, t) => backend.data.get(t.dataId).values;
const isF32 = (...ts) => ts.every((t) => t.dtype === 'float32');

function conv2DKernel(args) {
  const { inputs, backend, attrs } = args;
  const { x, filter } = inputs;
  const g = isF32(x, filter) && convGeometry(x.shape, filter.shape, attrs.strides, attrs.pad, attrs.dimRoundingMode, attrs.dataFormat, attrs.dilations);
  if (!g) return callOriginal(tf.Conv2D, args);
  return backend.makeTensorInfo(g.outShape, 'float32', conv2dForward(vals(backend, x), vals(backend, filter), g));
}

const FUSED_ACTIVATIONS = new Set([undefined, null, 'linear', 'relu', 'relu6']);

function fusedConv2DKernel(args) {
  const { inputs, backend, attrs } = args;
  const { x, filter, bias } = inputs;
  const fast =
    isF32(x, filter) &&
    FUSED_ACTIVATIONS.has(attrs.activation) &&
    (!bias || (bias.dtype === 'float32' && bias.shape.length <= 1 && (bias.shape.length === 0 || bias.shape[0] === filter.shape[3] || bias.shape[0] === 1)));
  const g = fast && convGeometry(x.shape, filter.shape, attrs.strides, attrs.pad, attrs.dimRoundingMode, attrs.dataFormat, attrs.dilations);
  if (!g) return callOriginal(tf.FusedConv2D, args);
  const y = conv2dForward(vals(backend, x), vals(backend, filter), g, bias ? vals(backend, bias) : null);
  if (attrs.activation === 'relu') {
    for (let i = 0; i < y.length; i++) if (y[i] < 0) y[i] = 0;
  } else if (attrs.activation === 'relu6') {
    for (let i = 0; i < y.length; i++) y[i] = y[i] < 0 ? 0 : y[i] > 6 ? 6 : y[i];
  }
  return backend.makeTensorInfo(g.outShape, 'float32', y);
}

function conv2DBackpropFilterKernel(args) {
  const { inputs, backend, attrs } = args;
  const { x, dy } = inputs;
  const g = isF32(x, dy) && convGeometry(x.shape, attrs.filterShape, attrs.strides, attrs.pad, attrs.dimRoundingMode, attrs.dataFormat, 1);
  if (!g) return callOriginal(tf.Conv2DBackpropFilter, args);
  return backend.makeTensorInfo(g.filterShape, 'float32', conv2dFilterGrad(vals(backend, x), vals(backend, dy), g));
}

function conv2DBackpropInputKernel(args) {
  const { inputs, backend, attrs } = args;
  const { dy, filter } = inputs;
  const g = isF32(dy, filter) && convGeometry(attrs.inputShape, filter.shape, attrs.strides, attrs.pad, attrs.dimRoundingMode, attrs.dataFormat, 1);
  if (!g) return callOriginal(tf.Conv2DBackpropInput, args);
  return backend.makeTensorInfo(g.inShape, 'float32', conv2dInputGrad(vals(backend, dy), vals(backend, filter), g));
}

function depthwiseGeometry(xShape, filterShape, attrs) {
  if (filterShape[3] !== 1) return null; // channel multiplier 1 only (MobileNet's)
  return convGeometry(xShape, filterShape, attrs.strides, attrs.pad, attrs.dimRoundingMode, attrs.dataFormat, attrs.dilations, true);
}

function depthwiseKernel(args) {
  const { inputs, backend, attrs } = args;
  const { x, filter } = inputs;
  const g = isF32(x, filter) && depthwiseGeometry(x.shape, filter.shape, attrs);
  if (!g) return callOriginal(tf.DepthwiseConv2dNative, args);
  return backend.makeTensorInfo(g.outShape, 'float32', depthwiseForward(vals(backend, x), vals(backend, filter), g));
}

function depthwiseFilterKernel(args) {
  const { inputs, backend, attrs } = args;
  const { x, dy } = inputs;
  const g = isF32(x, dy) && depthwiseGeometry(x.shape, attrs.filterShape, attrs);
  if (!g) return callOriginal(tf.DepthwiseConv2dNativeBackpropFilter, args);
  return backend.makeTensorInfo(g.filterShape, 'float32', depthwiseFilterGrad(vals(backend, x), vals(backend, dy), g));
}

function depthwiseInputKernel(args) {
  const { inputs, backend, attrs } = args;
  const { dy, filter } = inputs;
  const g = isF32(dy, filter) && depthwiseGeometry(attrs.inputShape, filter.shape, attrs);
  if (!g) return callOriginal(tf.DepthwiseConv2dNativeBackpropInput, args);
  return backend.makeTensorInfo(g.inShape, 'float32', depthwiseInputGrad(vals(backend, dy), vals(backend, filter), g));
}

function maxPoolKernel(args) {
  const { inputs, backend, attrs } = args;
  const { x } = inputs;
  const { filterSize, strides, pad, dimRoundingMode } = attrs;
  if (!isF32(x) || x.shape.length !== 4) return callOriginal(tf.MaxPool, args);
  const info = bu.computePool2DInfo(x.shape, filterSize, strides, 1, pad, dimRoundingMode);
  return backend.makeTensorInfo(info.outShape, 'float32', maxPoolForward(vals(backend, x), info));
}

function maxPoolGradKernel(args) {
  const { inputs, backend, attrs } = args;
  const { dy, input } = inputs;
  const { filterSize, strides, pad, dimRoundingMode } = attrs;
  if (!isF32(dy, input) || input.shape.length !== 4) return callOriginal(tf.MaxPoolGrad, args);
  const info = bu.computePool2DInfo(input.shape, filterSize, strides, 1, pad, dimRoundingMode);
  return backend.makeTensorInfo(input.shape, 'float32', maxPoolGrad(vals(backend, input), vals(backend, dy), info));
}

function reduction(name, scale) {
  return (args) => {
    const { inputs, backend, attrs } = args;
    const { x } = inputs;
    if (x.dtype !== 'float32') return callOriginal(name, args);
    const axes = tf.util.parseAxisParam(attrs.axis, x.shape);
    const [outShape, reduceShape] = bu.computeOutAndReduceShapes(x.shape, axes);
    const n = tf.util.sizeFromShape(reduceShape);
    const acc = reduceSum(vals(backend, x), x.shape, axes);
    const out = new Float32Array(acc.length);
    for (let i = 0; i < acc.length; i++) out[i] = scale ? acc[i] / n : acc[i];
    const shape = attrs.keepDims ? bu.expandShapeToKeepDim(outShape, axes) : outShape;
    return backend.makeTensorInfo(shape, 'float32', out);
  };
}

function transposeKernel(args) {
  const { inputs, backend, attrs } = args;
  const { x } = inputs;
  if (x.dtype === 'string' || x.dtype === 'complex64' || x.shape.length < 2) {
    return callOriginal(tf.Transpose, args);
  }
  const values = vals(backend, x);
  const out = x.dtype === 'float32' ? out32(values.length, false) : new values.constructor(values.length);
  transpose(values, x.shape, attrs.perm, out);
  return backend.makeTensorInfo(
    attrs.perm.map((p) => x.shape[p]),
    x.dtype,
    out,
  );
}

function binary(name, code) {
  return (args) => {
    const { inputs, backend } = args;
    const { a, b } = inputs;
    if (!isF32(a, b)) return callOriginal(name, args);
    const outShape = bu.assertAndGetBroadcastShape(a.shape, b.shape);
    const size = tf.util.sizeFromShape(outShape);
    const out = out32(size, false);
    const av = vals(backend, a);
    const bv = vals(backend, b);
    if (av.length === size && bv.length === size) binaryRow(code, av, 0, 1, bv, 0, 1, out, 0, size);
    else broadcastBinary(code, av, a.shape, bv, b.shape, outShape, out);
    return backend.makeTensorInfo(outShape, 'float32', out);
  };
}

/** ClipByValue (MobileNet's ReLU6) and Relu as plain loops (the backend calls a closure per entry). */
function clipKernel(args) {
  const { inputs, backend, attrs } = args;
  const { x } = inputs;
  if (!isF32(x)) return callOriginal(tf.ClipByValue, args);
  const { clipValueMin: lo, clipValueMax: hi } = attrs;
  const v = vals(backend, x);
  const out = out32(v.length, false);
  for (let i = 0; i < v.length; i++) {
    const e = v[i];
    out[i] = e > hi ? hi : e < lo ? lo : e;
  }
  return backend.makeTensorInfo(x.shape, 'float32', out);
}

function reluKernel(args) {
  const { inputs, backend } = args;
  const { x } = inputs;
  if (!isF32(x)) return callOriginal(tf.Relu, args);
  const v = vals(backend, x);
  const out = out32(v.length, false);
  for (let i = 0; i < v.length; i++) out[i] = v[i] < 0 ? 0 : v[i]; // NaN stays NaN, as Math.max
  return backend.makeTensorInfo(x.shape, 'float32', out);
}

const NUMERIC = new Set(['float32', 'int32', 'bool']);

function sliceKernel(args) {
  const { inputs, backend, attrs } = args;
  const { x } = inputs;
  if (!NUMERIC.has(x.dtype) || x.shape.length < 2) return callOriginal(tf.Slice, args);
  const [begin, size] = tf.slice_util.parseSliceParams(x, attrs.begin, attrs.size);
  if (tf.slice_util.isSliceContinous(x.shape, begin, size)) return callOriginal(tf.Slice, args);
  tf.slice_util.assertParamsValid(x, begin, size);
  const values = vals(backend, x);
  const n = tf.util.sizeFromShape(size);
  const out = x.dtype === 'float32' ? out32(n, false) : new values.constructor(n);
  copyBlock(values, x.shape, begin, out, size, new Array(size.length).fill(0), size);
  return backend.makeTensorInfo(size, x.dtype, out);
}

function padKernel(args) {
  const { inputs, backend, attrs } = args;
  const { x } = inputs;
  if (!NUMERIC.has(x.dtype) || x.shape.length < 1) return callOriginal(tf.PadV2, args);
  const { paddings, constantValue } = attrs;
  const outShape = paddings.map((p, i) => p[0] + x.shape[i] + p[1]);
  const values = vals(backend, x);
  const n = tf.util.sizeFromShape(outShape);
  const out = x.dtype === 'float32' ? out32(n, constantValue === 0) : new values.constructor(n);
  if (constantValue !== 0) out.fill(constantValue);
  copyBlock(values, x.shape, new Array(x.shape.length).fill(0), out, outShape, paddings.map((p) => p[0]), x.shape);
  return backend.makeTensorInfo(outShape, x.dtype, out);
}

/** kernel name -> replacement, in the order registered. */
export const FAST_KERNELS = {
  [tf.Conv2D]: conv2DKernel,
  [tf.FusedConv2D]: fusedConv2DKernel,
  [tf.Conv2DBackpropFilter]: conv2DBackpropFilterKernel,
  [tf.Conv2DBackpropInput]: conv2DBackpropInputKernel,
  [tf.DepthwiseConv2dNative]: depthwiseKernel,
  [tf.DepthwiseConv2dNativeBackpropFilter]: depthwiseFilterKernel,
  [tf.DepthwiseConv2dNativeBackpropInput]: depthwiseInputKernel,
  [tf.MaxPool]: maxPoolKernel,
  [tf.MaxPoolGrad]: maxPoolGradKernel,
  [tf.Sum]: reduction(tf.Sum, false),
  [tf.Mean]: reduction(tf.Mean, true),
  [tf.Transpose]: transposeKernel,
  [tf.ClipByValue]: clipKernel,
  [tf.Relu]: reluKernel,
  [tf.Slice]: sliceKernel,
  [tf.PadV2]: padKernel,
  [tf.Add]: binary(tf.Add, 0),
  [tf.Sub]: binary(tf.Sub, 1),
  [tf.Multiply]: binary(tf.Multiply, 2),
  [tf.RealDiv]: binary(tf.RealDiv, 3),
};

/**
 * ReLU's gradient dy * step(x) in one pass (TF.js: Step, Cast, Multiply: three passes over a
 * full activation): registered as a cpu kernel of its own, used by the Relu gradient below.
 */
const RELU_GRAD = 'SpliteasyReluGrad';

function reluGradKernel({ inputs, backend }) {
  const { dy, x } = inputs;
  const d = vals(backend, dy);
  const v = vals(backend, x);
  const out = out32(v.length, false);
  // step(NaN) is NaN and step(x) is 1 above 0, else 0; times dy, as TF.js' own gradient.
  for (let i = 0; i < v.length; i++) out[i] = d[i] * (v[i] > 0 ? 1 : v[i] === v[i] ? 0 : NaN);
  return backend.makeTensorInfo(x.shape, 'float32', out);
}

/**
 * ClipByValue's (ReLU6's) gradient, dy where min <= x <= max else 0, in one pass (TF.js:
 * GreaterEqual, LessEqual, LogicalAnd, ZerosLike, Select over a full activation each).
 */
const CLIP_GRAD = 'SpliteasyClipGrad';

function clipGradKernel({ inputs, backend, attrs }) {
  const { dy, x } = inputs;
  const d = vals(backend, dy);
  const v = vals(backend, x);
  const lo = Math.fround(attrs.clipValueMin);
  const hi = Math.fround(attrs.clipValueMax);
  const out = out32(v.length, false);
  for (let i = 0; i < v.length; i++) out[i] = v[i] >= lo && v[i] <= hi ? d[i] : 0;
  return backend.makeTensorInfo(x.shape, 'float32', out);
}

let clipGradOriginal = null;

/** ClipByValue's gradient through CLIP_GRAD on the cpu backend (float32), TF.js' own elsewhere. */
const fastClipGrad = {
  kernelName: tf.ClipByValue,
  inputsToSave: ['x'],
  gradFunc: (dy, saved, attrs) => {
    const [x] = saved;
    const fast = tf.getBackend() === 'cpu' && dy.dtype === 'float32' && x.dtype === 'float32' && tf.getKernel(CLIP_GRAD, 'cpu');
    if (!fast) return clipGradOriginal.gradFunc(dy, saved, attrs);
    const { clipValueMin, clipValueMax } = attrs;
    return { x: () => tf.engine().runKernel(CLIP_GRAD, { dy, x }, { clipValueMin, clipValueMax }) };
  },
};

let reluGradOriginal = null;

/** Relu's gradient through RELU_GRAD on the cpu backend (float32), TF.js' own elsewhere. */
const fastReluGrad = {
  kernelName: tf.Relu,
  inputsToSave: ['x'],
  gradFunc: (dy, saved) => {
    const [x] = saved;
    const fast = tf.getBackend() === 'cpu' && dy.dtype === 'float32' && x.dtype === 'float32' && tf.getKernel(RELU_GRAD, 'cpu');
    if (!fast) return reluGradOriginal.gradFunc(dy, saved);
    return { x: () => tf.engine().runKernel(RELU_GRAD, { dy, x }) };
  },
};

/**
 * Put the fast kernels in place of the cpu backend's (idempotent). `only` limits the set
 * (the kernel tests and the benchmark compare each one against the original).
 */
export function registerFastKernels(only = Object.keys(FAST_KERNELS)) {
  for (const name of only) {
    const current = tf.getKernel(name, 'cpu');
    if (current?.fast) continue;
    originals.set(name, current);
    tf.unregisterKernel(name, 'cpu');
    tf.registerKernel({ kernelName: name, backendName: 'cpu', kernelFunc: fastly(FAST_KERNELS[name]), fast: true });
  }
  if (only.includes(tf.Relu) && !tf.getKernel(RELU_GRAD, 'cpu')) {
    tf.registerKernel({ kernelName: RELU_GRAD, backendName: 'cpu', kernelFunc: fastly(reluGradKernel) });
    reluGradOriginal = tf.getGradient(tf.Relu);
    tf.registerGradient(fastReluGrad);
  }
  if (only.includes(tf.ClipByValue) && !tf.getKernel(CLIP_GRAD, 'cpu')) {
    tf.registerKernel({ kernelName: CLIP_GRAD, backendName: 'cpu', kernelFunc: fastly(clipGradKernel) });
    clipGradOriginal = tf.getGradient(tf.ClipByValue);
    tf.registerGradient(fastClipGrad);
  }
}

/** Put the backend's own kernels back (for measurements against them). */
export function restoreKernels(only = [...originals.keys()]) {
  for (const name of only) {
    const orig = originals.get(name);
    if (!orig) continue;
    tf.unregisterKernel(name, 'cpu');
    tf.registerKernel(orig);
  }
  if (only.includes(tf.Relu) && reluGradOriginal) {
    tf.registerGradient(reluGradOriginal);
    tf.unregisterKernel(RELU_GRAD, 'cpu');
    reluGradOriginal = null;
  }
  if (only.includes(tf.ClipByValue) && clipGradOriginal) {
    tf.registerGradient(clipGradOriginal);
    tf.unregisterKernel(CLIP_GRAD, 'cpu');
    clipGradOriginal = null;
  }
}

/**
 * BatchNormalization in training mode, channels last, as one op with its own gradient (issue
 * #12): y = (x - mean) * (rsqrt(var + eps) * gamma) + beta over every axis but the last, with
 * mean and var the batch's (biased) moments -- the very float32 roundings of the op-by-op form
 * in layers.mjs (tf.moments, sub, mul, add; sums in float64), in 3 passes over x instead of
 * ~8, and a gradient in 2 passes over x and dy instead of ~15 broadcasting ops:
 *   dbeta = sum(dy), dgamma = inv * sum(dy * (x - mean)),
 *   dx = gamma * inv / n * (n dy - sum(dy) - (x - mean) inv^2 sum(dy * (x - mean))),
 * inv = rsqrt(var + eps), sums in float64 (the op-by-op gradient's, through the moments, up
 * to float32 rounding).
 *
 * Returns {y, mean, variance} (mean and variance as constants: the caller's moving
 * statistics), or null where it does not apply (a backend other than cpu with the fast
 * kernels, the channel axis not last, not float32): the caller then computes op by op.
 */
export function batchNormTraining(x, gamma, beta, epsilon) {
  if (tf.getBackend() !== 'cpu' || !tf.getKernel(tf.Conv2D, 'cpu')?.fast) return null;
  if (x.dtype !== 'float32' || x.rank < 2) return null;
  const C = x.shape[x.rank - 1];
  if (gamma.size !== C || beta.size !== C || gamma.dtype !== 'float32' || beta.dtype !== 'float32') return null;
  const backend = tf.backend();
  const n = x.size / C;
  const eps = Math.fround(epsilon);
  const mean = new Float32Array(C);
  const variance = new Float32Array(C);
  const inv = new Float32Array(C);
  const op = tf.customGrad(fastly((xT, gT, bT, save) => {
    const xv = vals(backend, xT);
    const gv = vals(backend, gT);
    const bv = vals(backend, bT);
    const acc = new Float64Array(C);
    for (let s = 0; s < xv.length; s += C) for (let c = 0; c < C; c++) acc[c] += xv[s + c];
    for (let c = 0; c < C; c++) mean[c] = acc[c] / n;
    acc.fill(0);
    for (let s = 0; s < xv.length; s += C) {
      for (let c = 0; c < C; c++) {
        const d = Math.fround(xv[s + c] - mean[c]);
        acc[c] += Math.fround(d * d);
      }
    }
    const factor = new Float32Array(C);
    for (let c = 0; c < C; c++) {
      variance[c] = acc[c] / n;
      inv[c] = 1 / Math.sqrt(Math.fround(variance[c] + eps));
      factor[c] = inv[c] * gv[c];
    }
    const y = out32(xv.length, false);
    for (let s = 0; s < xv.length; s += C) {
      for (let c = 0; c < C; c++) y[s + c] = Math.fround(Math.fround(xv[s + c] - mean[c]) * factor[c]) + bv[c];
    }
    save([xT, gT]);
    return {
      value: tf.tensor(y, xT.shape, 'float32'),
      gradFunc: fastly((dy, [xs, gs]) => {
        const dyv = dy.dataSync();
        const xs2 = vals(backend, xs);
        const g2 = vals(backend, gs);
        const sdy = new Float64Array(C);
        const sdyx = new Float64Array(C);
        for (let s = 0; s < xs2.length; s += C) {
          for (let c = 0; c < C; c++) {
            const d = dyv[s + c];
            sdy[c] += d;
            sdyx[c] += d * Math.fround(xs2[s + c] - mean[c]);
          }
        }
        const a = new Float64Array(C); // gamma inv / n
        const k = new Float64Array(C); // inv^2 sdyx
        for (let c = 0; c < C; c++) {
          a[c] = (g2[c] * inv[c]) / n;
          k[c] = inv[c] * inv[c] * sdyx[c];
        }
        const dx = out32(xs2.length, false);
        for (let s = 0; s < xs2.length; s += C) {
          for (let c = 0; c < C; c++) {
            dx[s + c] = a[c] * (n * dyv[s + c] - sdy[c] - Math.fround(xs2[s + c] - mean[c]) * k[c]);
          }
        }
        const dgamma = new Float32Array(C);
        for (let c = 0; c < C; c++) dgamma[c] = inv[c] * sdyx[c];
        return [
          tf.tensor(dx, xs.shape, 'float32'),
          tf.tensor(dgamma, gs.shape, 'float32'),
          tf.tensor(Float32Array.from(sdy), bT.shape, 'float32'),
        ];
      }),
    };
  }));
  const y = op(x, gamma, beta);
  return { y, mean: tf.tensor(mean, [C], 'float32'), variance: tf.tensor(variance, [C], 'float32') };
}
