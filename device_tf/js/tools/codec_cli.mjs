// Cross-language codec check, driven by tests/test_js_frame.py:
//   node tools/codec_cli.mjs decode IN OUT   decode IN (Python-encoded), describe its frames as
//                                           JSON on stdout, write them re-encoded to OUT
//   node tools/codec_cli.mjs encode SPEC OUT encode the frames SPEC (JSON) describes to OUT
// A FrameError is reported as {"error": <class name>, "message": ...} with exit status 0.
import { readFile, writeFile } from 'node:fs/promises';

import { FrameError } from '../src/errors.mjs';
import { decode, encode, frame, sessionBytes, sessionHex } from '../src/frame.mjs';

const ARRAYS = { float32: Float32Array, int32: Int32Array, int64: BigInt64Array, uint8: Uint8Array, float16: Uint16Array };
const [cmd, src, dst] = process.argv.slice(2);
try {
  if (cmd === 'decode') {
    const frames = decode(new Uint8Array(await readFile(src)));
    const out = frames.map((f) => ({
      kind: f.kind,
      name: f.name,
      dtype: f.dtype,
      shape: f.shape,
      layout: f.layout,
      session: sessionHex(f.session),
      step: f.step,
      data: Array.from(f.data, (v) => (typeof v === 'bigint' ? v.toString() : v)),
    }));
    await writeFile(dst, encode(frames));
    console.log(JSON.stringify({ frames: out }));
  } else if (cmd === 'encode') {
    const spec = JSON.parse(await readFile(src, 'utf8'));
    const frames = spec.map((s) => {
      const Ctor = ARRAYS[s.dtype];
      const data = s.dtype === 'int64' ? Ctor.from(s.data.map(BigInt)) : Ctor.from(s.data);
      return frame(s.kind, s.name, data, s.shape, s.layout, { session: sessionBytes(s.session), step: s.step, dtype: s.dtype });
    });
    await writeFile(dst, encode(frames));
    console.log(JSON.stringify({ ok: true }));
  } else {
    throw new Error(`unknown command ${cmd}`);
  }
} catch (err) {
  if (!(err instanceof FrameError)) throw err;
  console.log(JSON.stringify({ error: err.name, message: err.message }));
}
