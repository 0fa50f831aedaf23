import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { test } from 'node:test';

import { ProtocolError, StepConflict } from '../src/errors.mjs';
import { HttpTransport } from '../src/transport.mjs';

/** A server on 127.0.0.1 whose n-th request (0-based) is handled by plan[n] (the last repeats). */
async function serve(plan) {
  let n = 0;
  const seen = [];
  const server = createServer((req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      seen.push({ method: req.method, url: req.url, auth: req.headers.authorization, body: Buffer.concat(chunks) });
      plan[Math.min(n++, plan.length - 1)](req, res);
    });
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const url = `http://127.0.0.1:${server.address().port}`;
  return { url, seen, close: () => new Promise((r) => server.close(r)) };
}

const drop = (req, res) => res.socket.destroy();
const json = (status, obj, headers = {}) => (req, res) => {
  res.writeHead(status, { 'Content-Type': 'application/json', ...headers });
  res.end(JSON.stringify(obj));
};
const frames = (req, res) => {
  res.writeHead(200, { 'X-Spliteasy-Durable-Step': '7', 'X-Spliteasy-Server-Ms': '1.5', 'X-Spliteasy-Replayed': '1' });
  res.end(Buffer.from([1, 2, 3]));
};
/** Half a reply body, then the connection is cut. */
const cutReply = (req, res) => {
  res.writeHead(200, { 'Content-Length': '100' });
  res.write(Buffer.alloc(10));
  setTimeout(() => res.socket.destroy(), 5);
};

test('dropped connections, a cut reply and 503 shutting_down are waited out; the same body is sent again', async () => {
  const srv = await serve([drop, drop, cutReply, json(503, { error: 'shutting_down', detail: 'saving' }), frames]);
  const waits = [];
  const backs = [];
  const t = new HttpTransport(srv.url, { onWait: (w) => waits.push(w), onBack: (b) => backs.push(b) });
  t.attach({ sessionId: 'ab'.repeat(16), token: 'tok' });
  try {
    const reply = await t.exchange('forward', Uint8Array.from([9, 8, 7]));
    assert.deepEqual(Array.from(reply.body), [1, 2, 3]);
    assert.equal(reply.durableStep, 7);
    assert.equal(reply.serverMs, 1.5);
    assert.equal(reply.replayed, true);
    assert.equal(srv.seen.length, 5);
    for (const r of srv.seen) {
      assert.equal(r.url, `/v1/sessions/${'ab'.repeat(16)}/forward`);
      assert.equal(r.auth, 'Bearer tok');
      assert.deepEqual(Array.from(r.body), [9, 8, 7]);
    }
    assert.equal(waits.length, 3); // from the second failure on
    assert.match(waits.at(-1).why, /503 shutting_down/);
    assert.equal(backs.length, 1);
  } finally {
    await srv.close();
  }
});

test('an unreachable server is given up after --reconnect-timeout, with a message saying what to do', async () => {
  const srv = await serve([frames]);
  await srv.close(); // nothing listens there now
  const t = new HttpTransport(srv.url, { reconnectTimeoutMs: 400 });
  t.attach({ sessionId: 'cd'.repeat(16), token: 'tok' });
  const start = performance.now();
  await assert.rejects(t.exchange('backward', new Uint8Array(1)), (err) => {
    assert.ok(err instanceof ProtocolError);
    assert.match(err.message, /no answer for 0\.[4-9] s \(\d+ attempts; last: ECONNREFUSED\); is the server running\? Restart the same command/);
    return true;
  });
  const took = performance.now() - start;
  assert.ok(took >= 400 && took < 3000, `${took} ms`);
});

test('409 step_conflict carries the server position; other errors are named and not retried', async () => {
  const srv = await serve([
    json(409, { error: 'step_conflict', detail: 'expected step 10', next_step: 10, expect: 'forward', durable_step: 10 }),
    json(404, { error: 'unknown_session', detail: 'no such session' }),
    json(200, { session_id: 'ef'.repeat(16), next_step: 10, expect: 'forward', durable_step: 10 }),
  ]);
  const t = new HttpTransport(srv.url);
  t.attach({ sessionId: 'ef'.repeat(16), token: 'tok' });
  try {
    await assert.rejects(t.exchange('forward', new Uint8Array(1)), (err) => {
      assert.ok(err instanceof StepConflict);
      assert.deepEqual([err.nextStep, err.durableStep, err.expect, err.status], [10, 10, 'forward', 409]);
      return true;
    });
    await assert.rejects(t.exchange('forward', new Uint8Array(1)), (err) => {
      assert.ok(err instanceof ProtocolError && !(err instanceof StepConflict));
      assert.deepEqual([err.status, err.code], [404, 'unknown_session']);
      return true;
    });
    assert.deepEqual(await t.sessionInfo(), { nextStep: 10, durableStep: 10, expect: 'forward' });
    assert.equal(srv.seen.length, 3);
    assert.equal(srv.seen[2].method, 'GET');
  } finally {
    await srv.close();
  }
});
