/**
 * Getting bytes to the server and back with fetch; knows nothing of steps or tensors.
 *
 * Node 20's fetch (undici) and browsers keep the HTTP/1.1 connection alive between calls,
 * so a run pays the TCP handshake once. A request that fails in transit is sent again,
 * identically, a bounded number of times: every frame carries (session, step) and the
 * server answers a repeated step from its store, so a retry is never applied twice.
 */

import { ProtocolError } from './errors.mjs';
import { MEDIA_TYPE } from './frame.mjs';

const now = () => globalThis.performance.now();
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export class HttpTransport {
  /** @param baseUrl e.g. "http://127.0.0.1:8000" ('' in a page: same origin) */
  constructor(baseUrl, { retries = 3, timeoutMs = 60000 } = {}) {
    this.baseUrl = baseUrl.replace(/\/+$/, '');
    this.retries = retries;
    this.timeoutMs = timeoutMs;
    this.token = null;
  }

  async send(method, path, { body, headers = {} } = {}) {
    let last;
    for (let attempt = 0; attempt <= this.retries; attempt++) {
      let response;
      try {
        response = await fetch(this.baseUrl + path, {
          method,
          body,
          headers,
          keepalive: false, // (the page-unload flag, not connection reuse; that is on by default)
          signal: AbortSignal.timeout(this.timeoutMs),
        });
      } catch (err) {
        last = err;
        await sleep(Math.min(100 * 2 ** attempt, 2000));
        continue;
      }
      if (response.status >= 400) {
        const text = await response.text();
        let code = 'error';
        let detail = text.slice(0, 500);
        try {
          const j = JSON.parse(text);
          code = j.error ?? code;
          detail = j.detail ?? detail;
        } catch {
          // not JSON: keep the text
        }
        throw new ProtocolError(`server answered ${response.status} ${code}: ${detail}`, {
          status: response.status,
          code,
        });
      }
      return response;
    }
    const why = last?.cause?.message ?? last?.message ?? 'no answer';
    throw new ProtocolError(`${this.baseUrl}${path}: no answer after ${this.retries + 1} tries: ${why}`);
  }

  auth() {
    return this.token ? { Authorization: `Bearer ${this.token}` } : {};
  }

  async getJson(path) {
    return (await this.send('GET', path)).json();
  }

  async getBytes(path) {
    return new Uint8Array(await (await this.send('GET', path)).arrayBuffer());
  }

  async postJson(path, payload) {
    const r = await this.send('POST', path, {
      body: JSON.stringify(payload),
      headers: { 'Content-Type': 'application/json' },
    });
    return r.json();
  }

  /** POST a frame message; returns {body: Uint8Array, serverMs, roundTripMs}. */
  async postFrames(path, body) {
    const t0 = now();
    const r = await this.send('POST', path, { body, headers: { 'Content-Type': MEDIA_TYPE, ...this.auth() } });
    const reply = new Uint8Array(await r.arrayBuffer());
    const roundTripMs = now() - t0;
    const serverMs = Number.parseFloat(r.headers.get('X-Spliteasy-Server-Ms') ?? '0') || 0;
    return { body: reply, serverMs, roundTripMs };
  }

  async delete(path) {
    try {
      await fetch(this.baseUrl + path, { method: 'DELETE', headers: this.auth() });
    } catch {
      // the session expires on its own
    }
  }
}
