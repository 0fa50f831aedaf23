/**
 * Getting bytes to the server and back; knows nothing of steps or tensors.
 *
 * The step loop (loop.mjs) sees only the session interface below -- open a session, attach
 * to a stored one, ask where it stands, exchange one op's frames, close -- so it builds no
 * URL and handles no token, and another transport (a WebSocket one, issue #11) can stand
 * in for this one:
 *
 *   openSession({manifestSha256, auxLabel, codec}) -> {sessionId, token, nextStep, durableStep, codec}
 *   attach({sessionId, token})               a session a restarted device recovered
 *   sessionInfo()  -> {nextStep, durableStep, expect}   (GET /v1/sessions/{sid})
 *   exchange(op, body) -> {body, serverMs, roundTripMs, durableStep, replayed}
 *   closeSession()
 *
 * Node 20's fetch (undici) and browsers keep the HTTP/1.1 connection alive between calls,
 * so a run pays the TCP handshake once. A request that fails in transit is sent again,
 * identically: every frame carries (session, step) and the server answers a repeated step
 * from its store, so a retry is never applied twice. Every call is *patient* (as the Python
 * transport, device_tf/transport.py): while the server is unreachable (restarting, say) or
 * answers 503 busy / shutting_down, it retries at once, then backs off exponentially (0.1 s
 * doubling to 5 s) for up to `reconnectTimeoutMs` (default 300 s), reporting each wait
 * through `onWait` and the server's return through `onBack`, before giving up.
 */

import { ProtocolError, StepConflict } from './errors.mjs';
import { MEDIA_TYPE } from './frame.mjs';

const now = () => globalThis.performance.now();
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export const DURABLE_STEP_HEADER = 'X-Spliteasy-Durable-Step';

/** One line for a wait: what failed, for how long, what next. */
export function describeWait({ url, why, waitedMs, limitMs }) {
  return (
    `server ${url} unreachable (${why}); retrying with backoff for up to ${Math.round(limitMs / 1000)} s ` +
    `(waited ${Math.round(waitedMs / 1000)} s)`
  );
}

function intOrNull(v) {
  if (v === null || v === undefined || v === '') return null;
  const n = Number(v);
  return Number.isInteger(n) ? n : null;
}

/** 503/429 error codes that mean "come back later" (Retry-After), not "refused". */
const WAIT_CODES = new Set(['busy', 'shutting_down', 'rate_limited']);

/** An attempt that an identical later attempt may get through (not sooner than retryAfterMs). */
export class Retry extends Error {
  constructor(message, retryAfterMs = 0) {
    super(message);
    this.retryAfterMs = retryAfterMs;
  }
}

export class HttpTransport {
  /**
   * @param baseUrl e.g. "http://127.0.0.1:8000" ('' in a page: same origin)
   * @param onWait called with {url, why, waitedMs, delayMs, limitMs, attempt} before each wait
   *   (from the second failed attempt on); onBack with {url, waitedMs} when the server answers again
   */
  constructor(baseUrl, { retries = 3, timeoutMs = 60000, reconnectTimeoutMs = 300000, onWait = null, onBack = null, authKey = null } = {}) {
    this.baseUrl = baseUrl.replace(/\/+$/, '');
    this.authKey = authKey; // enrolment key for a server started with --auth-keys (session creation only)
    this.retries = retries;
    this.timeoutMs = timeoutMs;
    this.reconnectTimeoutMs = reconnectTimeoutMs;
    this.onWait = onWait;
    this.onBack = onBack;
    this.sessionId = '';
    this.token = null;
  }

  /**
   * One request, retried as described above; returns the whole reply, read to the end
   * inside the retry loop (a connection reset in the middle of a reply body is retried
   * too): {status, headers, body: Uint8Array, json()}. A 4xx/5xx answer is thrown as a
   * ProtocolError (StepConflict for 409 step_conflict).
   */
  async send(method, path, { body, headers = {}, patient = true } = {}) {
    const reply = await this.retrying(
      async () => {
        let response;
        try {
          response = await fetch(this.baseUrl + path, {
            method,
            body,
            headers,
            keepalive: false, // (the page-unload flag, not connection reuse; that is on by default)
            signal: AbortSignal.timeout(this.timeoutMs),
          });
          response = new Reply(response.status, response.headers, new Uint8Array(await response.arrayBuffer()));
        } catch (err) {
          const why = err?.cause?.code ?? err?.cause?.message ?? err?.message ?? 'no answer';
          if (/CERT|UNABLE_TO_VERIFY|SELF_SIGNED/.test(String(why))) {
            // an untrusted TLS certificate: waiting will not fix it
            throw new ProtocolError(
              `${this.baseUrl}: the server's TLS certificate is not trusted (${why}); ` +
                'give Node the CA that signed it (NODE_EXTRA_CA_CERTS=ca.pem, or spliteasy train --ca-file)',
            );
          }
          throw new Retry(String(why));
        }
        // 503 busy: B is another device's for now; 503 shutting_down: the server is writing
        // its final checkpoint before it stops. Both: wait as for a restart.
        // 429 rate_limited: too many sessions created from here; come back later.
        const code = response.status === 503 || response.status === 429 ? response.errorCode() : '';
        if (WAIT_CODES.has(code)) {
          // the server says when to come back (Retry-After, seconds): not sooner
          const afterMs = Math.min(Math.max(Number(response.headers.get('retry-after')) || 0, 0), 30) * 1000;
          throw new Retry(`${response.status} ${code}`, afterMs);
        }
        return response;
      },
      { target: `${this.baseUrl}${path}`, patient },
    );
    if (reply.status >= 400) throw rejection(reply);
    return reply;
  }

  /**
   * The one patience rule of both transports: call `attempt` until it resolves (or throws
   * anything but a Retry). The first retry at once (a lone dropped connection is not news),
   * then 0.1 s doubling to 5 s, never sooner than the server's Retry-After; `patient` calls
   * keep trying for reconnectTimeoutMs, impatient ones `retries` times. `onWait` hears of
   * every wait from the second failure on, `onBack` of the server's return.
   */
  async retrying(attempt, { target, patient = true }) {
    let firstFailure = null;
    let attempts = 0;
    for (;;) {
      let why = '';
      let retryAfterMs = 0;
      try {
        const result = await attempt();
        if (firstFailure !== null && attempts >= 2) this.onBack?.({ url: this.baseUrl, waitedMs: now() - firstFailure });
        return result;
      } catch (err) {
        if (!(err instanceof Retry)) throw err;
        why = err.message;
        retryAfterMs = err.retryAfterMs;
      }
      const t = now();
      firstFailure ??= t;
      attempts += 1;
      const waitedMs = t - firstFailure;
      const limitMs = patient ? this.reconnectTimeoutMs : 0;
      const outOfTime = patient ? attempts > 1 && waitedMs >= limitMs : attempts > this.retries;
      if (outOfTime) {
        const waited = `no answer for ${(waitedMs / 1000).toFixed(1)} s (${attempts} attempts; last: ${why})`;
        throw new ProtocolError(
          `${target}: ${waited}; is the server running?` + (patient ? ' Restart the same command to resume where it stopped.' : ''),
        );
      }
      let delayMs = Math.max(attempts === 1 ? 0 : Math.min(100 * 2 ** (attempts - 2), 5000), retryAfterMs);
      if (patient) delayMs = Math.min(delayMs, Math.max(firstFailure + limitMs - t, 0));
      if (attempts >= 2) this.onWait?.({ url: this.baseUrl, why, waitedMs, delayMs, limitMs: this.reconnectTimeoutMs, attempt: attempts });
      await sleep(delayMs);
    }
  }

  auth() {
    return this.token ? { Authorization: `Bearer ${this.token}` } : {};
  }

  async getJson(path) {
    return (await this.send('GET', path)).json();
  }

  async getBytes(path) {
    return (await this.send('GET', path)).body;
  }

  async postJson(path, payload, headers = {}) {
    const r = await this.send('POST', path, {
      body: JSON.stringify(payload),
      headers: { 'Content-Type': 'application/json', ...headers },
    });
    return r.json();
  }

  // -- the session interface --------------------------------------------------------

  /** A new session for this manifest; the transport keeps its id and token. */
  async openSession({ manifestSha256, auxLabel = false, codec = 'float32' }) {
    const key = this.authKey ? { Authorization: `Bearer ${this.authKey}` } : {};
    const request = { manifest_sha256: manifestSha256, aux_label: auxLabel };
    if (codec !== 'float32') request.codec = codec; // the wire codec (codec.mjs); the server may refuse it (422)
    const reply = await this.postJson('/v1/sessions', request, key);
    this.sessionId = reply.session_id;
    this.token = reply.token;
    return {
      sessionId: reply.session_id,
      token: reply.token,
      nextStep: Number(reply.next_step ?? 0),
      durableStep: intOrNull(reply.durable_step) ?? 0,
      codec: reply.codec ?? 'float32',
    };
  }

  /** Use a session this device opened before (recovered from its state after a restart). */
  attach({ sessionId, token }) {
    this.sessionId = sessionId;
    this.token = token;
  }

  /** Where the server holds the session: {nextStep, durableStep, expect}. */
  async sessionInfo() {
    const r = await this.send('GET', `/v1/sessions/${this.sessionId}`, { headers: this.auth() });
    const j = await r.json();
    return { nextStep: Number(j.next_step), durableStep: intOrNull(j.durable_step) ?? 0, expect: j.expect ?? null };
  }

  /**
   * POST one op's frame message (op: forward, backward, step, infer).
   * Returns {body: Uint8Array, serverMs, roundTripMs, durableStep: number|null, replayed}.
   */
  async exchange(op, body) {
    const t0 = now();
    const r = await this.send('POST', `/v1/sessions/${this.sessionId}/${op}`, {
      body,
      headers: { 'Content-Type': MEDIA_TYPE, ...this.auth() },
    });
    const roundTripMs = now() - t0;
    const serverMs = Number.parseFloat(r.headers.get('X-Spliteasy-Server-Ms') ?? '0') || 0;
    return {
      body: r.body,
      serverMs,
      roundTripMs,
      durableStep: intOrNull(r.headers.get(DURABLE_STEP_HEADER)),
      replayed: r.headers.get('X-Spliteasy-Replayed') === '1',
    };
  }

  /** End the session on the server (best effort: the server evicts idle sessions anyway). */
  async closeSession() {
    if (!this.sessionId) return;
    try {
      await fetch(`${this.baseUrl}/v1/sessions/${this.sessionId}`, {
        method: 'DELETE',
        headers: this.auth(),
        signal: AbortSignal.timeout(10000),
      });
    } catch {
      // the session expires on its own
    }
    this.sessionId = '';
    this.token = null;
  }
}

/** A reply read to its end. */
class Reply {
  constructor(status, headers, body) {
    this.status = status;
    this.headers = headers;
    this.body = body;
  }

  text() {
    return new TextDecoder().decode(this.body);
  }

  json() {
    return JSON.parse(this.text());
  }

  /** The `error` code of a JSON error reply, or ''. */
  errorCode() {
    try {
      return this.json().error ?? '';
    } catch {
      return '';
    }
  }
}

/** The error for a 4xx/5xx reply: its JSON {error, detail, ...} named; 409 step_conflict typed. */
function rejection(reply) {
  const text = reply.text();
  let code = 'error';
  let detail = text.slice(0, 500);
  let body = null;
  try {
    body = JSON.parse(text);
    code = body.error ?? code;
    detail = body.detail ?? detail;
  } catch {
    // not JSON: keep the text
  }
  const message = `server answered ${reply.status} ${code}: ${detail}`;
  if (reply.status === 409 && code === 'step_conflict' && Number.isInteger(body?.next_step)) {
    return new StepConflict(message, {
      nextStep: body.next_step,
      durableStep: intOrNull(body.durable_step),
      expect: body.expect ?? null,
    });
  }
  return new ProtocolError(message, { status: reply.status, code, body });
}

// -- the WebSocket binding (issue #11) ------------------------------------------------------

/** Op codes of the WebSocket envelope (docs/protocol.md, "WebSocket binding"). */
export const WS_OPS = { forward: 1, backward: 2, step: 3, infer: 4 };

/**
 * Frames over one WebSocket (`/v1/sessions/{sid}/ws`) for the whole run; sessions, health
 * and deletion stay HTTP (the methods inherited from HttpTransport). In Node the `ws`
 * package sends the token as `Authorization: Bearer`; a browser page or Web Worker uses
 * the native WebSocket, which cannot set headers, so the token travels as the subprotocol
 * `bearer.<token>` beside `spliteasy.v1`.
 *
 * Exactly-once survives a dropped socket as over HTTP: the same message is sent again on a
 * new socket and the server answers an applied step from its retry store. Waits are the
 * HTTP transport's, by the same code (`retrying`: at once, then 0.1 s doubling to 5 s, for
 * up to reconnectTimeoutMs; the server's retry_after on busy / shutting_down / rate_limited).
 * Keepalive: uvicorn pings every 20 s (answered by both clients); in Node the client
 * pings too (`pingIntervalMs`) and drops a socket whose pong does not come back.
 */
export class WsTransport extends HttpTransport {
  constructor(baseUrl, options = {}) {
    super(baseUrl, options);
    this.pingIntervalMs = options.pingIntervalMs ?? 20000;
    this.ws = null;
    this.wsSession = '';
    this.rid = 0;
    this.pending = null;
    this.connections = 0; // sockets opened so far: more than 1 means it reconnected
  }

  wsUrl() {
    const base = this.baseUrl || globalThis.location?.origin || '';
    return `${base.replace(/^http/, 'ws')}/v1/sessions/${this.sessionId}/ws`;
  }

  /** The open socket for this session, connecting when there is none. */
  async socket() {
    if (this.ws && this.wsSession === this.sessionId && this.ws.readyState === 1) return this.ws;
    this.drop();
    const isNode = Boolean(globalThis.process?.versions?.node) && typeof globalThis.window === 'undefined';
    let ws;
    if (isNode) {
      const { default: NodeWebSocket } = await import('ws');
      ws = new NodeWebSocket(this.wsUrl(), ['spliteasy.v1'], {
        headers: { Authorization: `Bearer ${this.token}` },
        maxPayload: 0,
        handshakeTimeout: Math.min(this.timeoutMs, 30000),
      });
    } else {
      ws = new globalThis.WebSocket(this.wsUrl(), ['spliteasy.v1', `bearer.${this.token}`]);
    }
    ws.binaryType = 'arraybuffer';
    try {
      await new Promise((resolve, reject) => {
        ws.onopen = resolve;
        ws.onerror = (ev) => reject(new Error(ev?.message ?? ev?.error?.message ?? 'websocket error'));
        ws.onclose = (ev) => reject(new Error(`websocket closed (${ev?.code ?? '?'})`));
      });
    } catch (err) {
      try {
        ws.close();
      } catch {
        // already gone
      }
      // The handshake's refusal (401/403/404) is not visible to a browser: ask over HTTP,
      // which throws the server's JSON error when the session or token is the problem.
      try {
        await this.send('GET', `/v1/sessions/${this.sessionId}`, { headers: this.auth(), patient: false });
      } catch (httpErr) {
        if (httpErr instanceof ProtocolError && httpErr.status >= 400 && httpErr.status !== 429 && httpErr.status < 500) throw httpErr;
      }
      throw new Retry(err.message);
    }
    ws.onmessage = (ev) => this.onMessage(ev.data);
    ws.onclose = (ev) => this.onSocketGone(ws, `websocket closed (${ev?.code ?? '?'} ${ev?.reason ?? ''})`.trim());
    ws.onerror = () => {}; // a close follows
    if (typeof ws.ping === 'function' && this.pingIntervalMs > 0) {
      let alive = true;
      ws.on('pong', () => {
        alive = true;
      });
      const timer = setInterval(() => {
        if (!alive) return ws.terminate();
        alive = false;
        ws.ping();
      }, this.pingIntervalMs);
      timer.unref?.();
      ws.on('close', () => clearInterval(timer));
    }
    this.ws = ws;
    this.wsSession = this.sessionId;
    this.connections += 1;
    return ws;
  }

  onSocketGone(ws, why) {
    if (this.ws === ws) this.ws = null;
    const p = this.pending;
    if (p) {
      this.pending = null;
      p.reject(new Retry(why));
    }
  }

  onMessage(data) {
    const p = this.pending;
    if (!p) return;
    if (typeof data === 'string') {
      const err = JSON.parse(data);
      if (err.id !== p.rid) return; // the answer to an earlier attempt
      this.pending = null;
      const { id: _id, status, retry_after: retryAfter, ...body } = err;
      if ((status === 503 || status === 429) && WAIT_CODES.has(body.error)) {
        p.reject(new Retry(`${status} ${body.error}`, Math.min(Math.max(Number(retryAfter) || 0, 0), 30) * 1000));
      } else {
        p.reject(rejection(new Reply(status, new Headers(), new TextEncoder().encode(JSON.stringify(body)))));
      }
      return;
    }
    const bytes = new Uint8Array(data);
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    if (bytes.byteLength < 7 || bytes[0] !== (0x80 | p.code) || view.getUint32(1) !== p.rid) return;
    const metaLen = view.getUint16(5);
    this.pending = null;
    const meta = JSON.parse(new TextDecoder().decode(bytes.subarray(7, 7 + metaLen)));
    p.resolve({ meta, frames: bytes.slice(7 + metaLen) });
  }

  /** One attempt: send the message on the (re)opened socket and wait for its reply. */
  async once(code, body) {
    const ws = await this.socket();
    this.rid = (this.rid + 1) >>> 0;
    const rid = this.rid;
    const message = new Uint8Array(5 + body.byteLength);
    message[0] = code;
    new DataView(message.buffer).setUint32(1, rid);
    message.set(body instanceof Uint8Array ? body : new Uint8Array(body), 5);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        if (this.pending?.rid !== rid) return;
        this.pending = null;
        this.drop();
        reject(new Retry(`no reply within ${this.timeoutMs / 1000} s`));
      }, this.timeoutMs);
      const done = (fn) => (v) => {
        clearTimeout(timer);
        fn(v);
      };
      this.pending = { rid, code, resolve: done(resolve), reject: done(reject) };
      ws.send(message);
    });
  }

  async exchange(op, body) {
    const code = WS_OPS[op];
    if (!code) throw new Error(`unknown operation ${op}`);
    const t0 = now();
    const { meta, frames } = await this.retrying(() => this.once(code, body), { target: this.wsUrl() });
    return {
      body: frames,
      serverMs: Number(meta.server_ms) || 0,
      roundTripMs: now() - t0,
      durableStep: intOrNull(meta.durable_step),
      replayed: Boolean(meta.replayed),
    };
  }

  /** Close the socket (a later exchange opens a new one). */
  drop() {
    const ws = this.ws;
    this.ws = null;
    this.wsSession = '';
    if (ws) {
      try {
        ws.close();
      } catch {
        // already gone
      }
    }
  }

  async openSession(args) {
    this.drop();
    return super.openSession(args);
  }

  attach(args) {
    this.drop();
    super.attach(args);
  }

  async closeSession() {
    this.drop();
    await super.closeSession();
  }
}

/** `http` or `ws`: the transport `--transport` (or the page's setting) names. */
export function makeTransport(kind, baseUrl, options = {}) {
  if (kind === 'http' || !kind) return new HttpTransport(baseUrl, options);
  if (kind === 'ws') return new WsTransport(baseUrl, options);
  throw new Error(`unknown transport ${kind} (http or ws)`);
}
