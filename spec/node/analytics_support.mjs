// Test support for netra's analytics: query ClickHouse over HTTP, run a
// private ClickHouse that a test may kill and restart, read the
// `analytics` health component, and drive echo traffic from several
// clients while keeping exact books of which calls were answered.
// Everything stays on 127.0.0.1.
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Client, home, httpJson, waitFor } from './support.mjs';

const clickhouseSh = join(home, 'spec/support/clickhouse.sh');

/** A fresh scratch directory (under NETRA_TEST_DIR when set). */
export function scratch(prefix) {
  const base = process.env.NETRA_TEST_DIR || tmpdir();
  mkdirSync(base, { recursive: true });
  return mkdtempSync(join(base, `${prefix}-`));
}

/** Runs SQL on ClickHouse at addr (host:port) as `default`; the body text. */
export async function chQuery(addr, sql) {
  const res = await fetch(`http://${addr}/`, { method: 'POST', body: sql });
  const text = await res.text();
  if (res.status !== 200) throw new Error(`ClickHouse ${res.status}: ${text}`);
  return text;
}

/** The rows of a TSV answer, each an array of (unescaped) strings. */
export async function chRows(addr, sql) {
  const text = await chQuery(addr, `${sql} FORMAT TabSeparated`);
  return text.split('\n').filter((l) => l.length).map((l) => l.split('\t').map(unescapeTsv));
}

export function unescapeTsv(s) {
  return s.replace(/\\(.)/g, (_, c) => ({ t: '\t', n: '\n', r: '\r', 0: '\0', b: '\b', f: '\f' }[c] ?? c));
}

/** A number from a one-value query. */
export async function chNumber(addr, sql) {
  return Number((await chQuery(addr, sql)).trim());
}

/** The address of the ClickHouse shared by the ctest run. */
export function sharedClickHouse() {
  const file = process.env.NETRA_TEST_CLICKHOUSE;
  if (!file) throw new Error('NETRA_TEST_CLICKHOUSE is not set: run this file under ctest');
  return readFileSync(file, 'utf8').trim();
}

/**
 * A private ClickHouse under a scratch directory; start() picks a port
 * the first time and keeps it for later starts (all return promises).
 * Call remove() at the end.
 */
export function privateClickHouse(prefix = 'ch') {
  const dir = scratch(prefix);
  // Asynchronous, so that client traffic goes on while a server starts.
  const run = (...args) => promisify(execFile)(clickhouseSh, args, { timeout: 90000 });
  const ch = {
    dir,
    port: undefined,
    get addr() { return `127.0.0.1:${ch.port}`; },
    get url() { return `http://default:@127.0.0.1:${ch.port}/default`; },
    async start() {
      // One more try when the machine is too busy for the first.
      for (let attempt = 1; ; attempt++) {
        try {
          await run('start', dir, ...(ch.port ? [String(ch.port)] : []));
          break;
        } catch (e) {
          if (attempt >= 2) throw e;
        }
      }
      ch.port = Number(readFileSync(join(dir, 'port'), 'utf8').trim());
    },
    async kill() { await run('kill', dir); },
    async stop() { await run('stop', dir); },
    async remove() {
      try { await run('kill', dir); } catch { /* already gone */ }
      rmSync(dir, { recursive: true, force: true });
    },
  };
  return ch;
}

/**
 * The `analytics` component: {status, message, observed}. Outside test
 * and development, set srv.adminToken (NETRA_ADMIN_TOKEN) to get details.
 */
export async function analyticsHealth(srv) {
  const headers = srv.adminToken ? { Authorization: `Bearer ${srv.adminToken}` } : {};
  const { body } = await httpJson(srv.port, '/health', headers);
  return body.netra.components.analytics;
}

/** Waits until the analytics component shows pred(observed, component). */
export async function waitAnalytics(srv, pred, timeoutMs = 60000, what = 'the analytics state') {
  let last;
  return waitFor(async () => {
    try { last = await analyticsHealth(srv); } catch { return undefined; }
    return last && pred(last.observed, last) ? last : undefined;
  }, timeoutMs, () => `timed out waiting for ${what}; last: ${JSON.stringify(last)}\n${srv.log()}`);
}

/**
 * One WebSocket client that keeps `window` echo calls in flight. Every
 * call has a unique text; `answered` holds the texts whose result came
 * back, `lost` those sent without an answer (the connection ended).
 */
export class EchoClient {
  constructor(ws, user) {
    this.ws = ws;
    this.user = user;
    this.pending = new Map();
    this.nextId = 1;
    this.closed = false;
    ws.on('message', (data) => {
      let msg;
      try { msg = JSON.parse(data.toString()); } catch { return; }
      const p = this.pending.get(msg.id);
      if (!p) return;
      this.pending.delete(msg.id);
      p.resolve(msg);
    });
    ws.on('close', () => {
      this.closed = true;
      for (const p of this.pending.values()) p.resolve(null);
      this.pending.clear();
    });
  }

  static async connect(url, user) {
    const c = await Client.connect(url, { headers: { 'X-Netra-User': user } });
    return new EchoClient(c.ws, user);
  }

  /** Resolves with the response, or null when the connection ended. */
  call(method, params) {
    if (this.closed) return Promise.resolve(null);
    const id = this.nextId++;
    return new Promise((resolve) => {
      this.pending.set(id, { resolve });
      this.ws.send(JSON.stringify({ jsonrpc: '2.0', id, method, params }));
    });
  }

  close() { if (!this.closed) this.ws.close(); }
}

/** Books for a traffic run: texts answered, texts sent but not answered. */
export function newBooks() {
  return { answered: new Set(), lost: new Set(), errors: [] };
}

/**
 * Runs echo traffic from one client until `limit()` says stop or the
 * connection ends: up to `window` calls in flight (each loop resting
 * pauseMs after an answer), each text unique
 * (`${user}:${tag}:${n}`). Calls answered with a result go to
 * books.answered; calls without an answer go to books.lost; a JSON-RPC
 * error or an isError result is kept in books.errors.
 */
export async function echoLoop(client, books, { tag, window = 4, limit, pauseMs = 0 }) {
  let n = 0;
  const one = async () => {
    while (!client.closed && limit()) {
      const text = `${client.user}:${tag}:${n++}`;
      const r = await client.call('tools/call', { name: 'echo', arguments: { text } });
      if (r === null) { books.lost.add(text); return; }
      if (r.result && !r.result.isError) books.answered.add(text);
      else books.errors.push(r);
      if (pauseMs) await sleep(pauseMs);
    }
  };
  await Promise.all(Array.from({ length: window }, one));
}

/** The texts (echo arguments) of one user's rows, FINAL, with duplicates. */
export async function echoTexts(addr, users) {
  const list = users.map((u) => `'${u}'`).join(',');
  const rows = await chRows(addr,
    `SELECT arguments FROM netra_tool_calls FINAL WHERE user_id IN (${list}) AND tool_name = 'echo'`);
  return rows.map(([a]) => JSON.parse(a).text);
}

/**
 * Asserts exactly-once against the books: every answered text is in
 * ClickHouse once, nothing appears twice, and anything beyond the
 * answered calls is a call that was sent without an answer (its record
 * was written before netra died, its result never left). Returns the
 * counts for messages.
 */
export function checkExactlyOnce(assert, texts, books) {
  const seen = new Map();
  for (const t of texts) seen.set(t, (seen.get(t) || 0) + 1);
  const dups = [...seen].filter(([, k]) => k > 1);
  assert.deepEqual(dups, [], 'rows counted twice after FINAL');
  const missing = [...books.answered].filter((t) => !seen.has(t));
  assert.deepEqual(missing.slice(0, 10), [], `${missing.length} answered call(s) missing from ClickHouse`);
  const strangers = [...seen.keys()].filter((t) => !books.answered.has(t) && !books.lost.has(t));
  assert.deepEqual(strangers.slice(0, 10), [], 'rows for calls that were never made');
  return { rows: texts.length, answered: books.answered.size, extra: texts.length - books.answered.size };
}

export function sleep(ms) { return new Promise((r) => setTimeout(r, ms)); }

/**
 * Stops netra with SIGTERM; when it has not exited within ms, kills it
 * and throws with its log, so that a hung shutdown fails the test instead
 * of hanging it.
 */
export async function stopWithin(srv, ms = 20000) {
  if (!srv) return;
  const done = srv.stop();
  const timer = sleep(ms).then(() => 'hung');
  if (await Promise.race([done, timer]) === 'hung') {
    await srv.kill();
    throw new Error(`netra did not stop within ${ms} ms of SIGTERM:\n${srv.log()}`);
  }
}
