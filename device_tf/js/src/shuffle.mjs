/**
 * Optional per-epoch shuffling for long runs (--seed): a seeded permutation from a small
 * PRNG, so a run is reproducible from its seed. It is not numpy's permutation: when JS and
 * Python must see the same batches, write the file in the order wanted and do not shuffle.
 */

function mulberry32(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** How an epoch's order follows from (seed, epoch): progress.json's shuffle.rule. */
export const SHUFFLE_RULE = 'mulberry32((seed * 1000003 + epoch) >>> 0) Fisher-Yates over the samples (shuffle.mjs)';

/** The data with its samples permuted by (seed, epoch): a copy, same shape. */
export function shuffled(data, seed, epoch) {
  const rand = mulberry32((seed * 1000003 + epoch) >>> 0);
  const order = Array.from({ length: data.count }, (_, i) => i);
  for (let i = order.length - 1; i > 0; i--) {
    const j = Math.floor(rand() * (i + 1));
    [order[i], order[j]] = [order[j], order[i]];
  }
  const per = data.sampleShape.reduce((a, b) => a * b, 1);
  const ly = (data.labelShape ?? []).reduce((a, b) => a * b, 1); // 1, or a label row's size
  const x = new data.x.constructor(data.x.length); // Float32Array features or Int32Array ids
  const y = new data.y.constructor(data.y.length); // Int32Array indices or Float32Array rows
  order.forEach((src, dst) => {
    x.set(data.x.subarray(src * per, (src + 1) * per), dst * per);
    y.set(data.y.subarray(src * ly, (src + 1) * ly), dst * ly);
  });
  return { ...data, x, y };
}
