// Test support for netra's WebSocket side: start `netra serve` as a real
// process on a free loopback port, connect real WebSocket clients, speak
// JSON-RPC. Everything stays on 127.0.0.1.
import { spawn } from 'node:child_process';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import WebSocket from 'ws';

export const bin = process.env.NETRA_BIN || 'build/netra';
export const home = process.env.NETRA_HOME || process.cwd();

/** Starts netra serve; resolves to {proc, port, log(), stop(), kill()}. */
export async function startNetra({ env = {}, args = ['--env', 'test'], ready = true } = {}) {
  const child = spawn(bin, ['serve', ...args, '--listen', '127.0.0.1:0'], {
    env: { ...process.env, NETRA_HOME: home, ...env },
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let log = '';
  child.stderr.on('data', (d) => { log += d.toString(); });
  const exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
  const port = await waitFor(() => {
    const m = log.match(/listening on http:\/\/127\.0\.0\.1:(\d+)/);
    return m ? Number(m[1]) : undefined;
  }, 20000, () => `netra did not listen:\n${log}`, exited);
  const server = {
    proc: child, port, exited,
    log: () => log,
    url: (query = '') => `ws://127.0.0.1:${port}/ws${query}`,
    async stop() { child.kill('SIGTERM'); return exited; },
    async kill() { child.kill('SIGKILL'); return exited; },
  };
  if (ready) {
    await waitFor(async () => (await httpStatus(port, '/health/ready')) === 200, 20000,
      () => `netra did not become ready:\n${log}`, exited);
  }
  return server;
}

/** Polls fn until it returns a value other than undefined/false. */
export async function waitFor(fn, timeoutMs = 20000, why = () => 'timed out', exited) {
  const deadline = Date.now() + timeoutMs;
  let gone = false;
  exited?.then(() => { gone = true; });
  for (;;) {
    const v = await fn();
    if (v !== undefined && v !== false) return v;
    if (gone) throw new Error(`process exited: ${why()}`);
    if (Date.now() > deadline) throw new Error(why());
    await new Promise((r) => setTimeout(r, 25));
  }
}

export async function httpStatus(port, path) {
  try {
    const res = await fetch(`http://127.0.0.1:${port}${path}`);
    await res.arrayBuffer();
    return res.status;
  } catch {
    return 0;
  }
}

export async function httpJson(port, path, headers = {}) {
  const res = await fetch(`http://127.0.0.1:${port}${path}`, { headers });
  return { status: res.status, body: await res.json() };
}

/**
 * A JSON-RPC client on one WebSocket. Collects every message; rpc() sends
 * a request and resolves with its response; events() returns the
 * netra/event notifications seen so far.
 */
export class Client {
  constructor(ws) {
    this.ws = ws;
    this.messages = [];
    this.waiters = [];
    this.nextId = 1;
    this.closed = new Promise((resolve) => {
      ws.on('close', (code, reason) => resolve({ code, reason: reason.toString() }));
    });
    ws.on('message', (data, isBinary) => {
      const text = data.toString();
      let msg;
      try { msg = JSON.parse(text); } catch { msg = { unparsable: text }; }
      msg.__raw = text;
      this.messages.push(msg);
      for (const w of [...this.waiters]) w();
    });
  }

  static async connect(url, { headers = {}, protocols = ['mcp'] } = {}) {
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(url, protocols, { headers, maxPayload: 64 * 1024 * 1024 });
      ws.once('open', () => resolve(new Client(ws)));
      ws.once('unexpected-response', (req, res) => {
        let body = '';
        res.on('data', (d) => { body += d; });
        res.on('end', () => reject(Object.assign(new Error(`HTTP ${res.statusCode}`), { status: res.statusCode, body })));
      });
      ws.once('error', reject);
    });
  }

  send(obj) { this.ws.send(typeof obj === 'string' ? obj : JSON.stringify(obj)); }

  /** Resolves with the first message (at or after index `from`) matching pred. */
  waitMessage(pred, timeoutMs = 20000, from = 0) {
    return new Promise((resolve, reject) => {
      const check = () => {
        const m = this.messages.slice(from).find(pred);
        if (m) {
          this.waiters = this.waiters.filter((w) => w !== check);
          clearTimeout(timer);
          resolve(m);
        }
      };
      const timer = setTimeout(() => {
        this.waiters = this.waiters.filter((w) => w !== check);
        reject(new Error(`no matching message in ${timeoutMs} ms; got ${JSON.stringify(this.messages.map((m) => m.__raw))}`));
      }, timeoutMs);
      this.waiters.push(check);
      check();
    });
  }

  async rpc(method, params, { id } = {}) {
    const rid = id ?? this.nextId++;
    const msg = { jsonrpc: '2.0', id: rid, method };
    if (params !== undefined) msg.params = params;
    this.send(msg);
    return this.waitMessage((m) => m.id === rid && (m.result !== undefined || m.error !== undefined));
  }

  events(pred = () => true) {
    return this.messages.filter((m) => m.method === 'netra/event').map((m) => m.params).filter(pred);
  }

  close() { this.ws.close(); return this.closed; }
}

/** Writes a temporary file and returns its path. */
export function tempFile(name, text) {
  const dir = mkdtempSync(join(tmpdir(), 'netra-node-'));
  const path = join(dir, name);
  writeFileSync(path, text);
  return path;
}
