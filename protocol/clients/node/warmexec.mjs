// A Node.js client of warmexec's wire protocol (docs/PROTOCOL.md), with npm's `zeromq`
// (v6) and `@msgpack/msgpack`: one-shot execs and streamed execs with credit.
//
//   const c = new Client("ipc:///run/warmexec/warmexec.sock");
//   const r = await c.exec("web1", ["cat", "/etc/hostname"]);        // {exit_code, stdout, ...}
//   const s = c.stream("web1", ["sh", "-c", "seq 1 100000"]);
//   for await (const ev of s.events()) { ... }                        // started, output, exit
//   c.close();
//
// Every message is one msgpack map {v: 1, id, op, ...}; replies echo the id. A streamed
// exec's events all carry its request's id: `started` (exec_id, pid), `output` (stream,
// seq, data), then `exit` (the one-shot reply's fields) or an error reply. The client
// gives back credit as the application takes output events, a quarter of the window at
// a time, and a heartbeat (credit 0) every second: a client that stops taking events
// stops the command, and one silent for its grace has it killed.

import { Dealer } from "zeromq";
import { decode, encode } from "@msgpack/msgpack";

export const DEFAULT_WINDOW = 1 << 20;
export const STDIN_WINDOW = 1 << 20;
const HEARTBEAT_MS = 1000;

export class WarmexecError extends Error {
  constructor(code, message) {
    super(`${code}: ${message}`);
    this.code = code;
  }
}

function compact(fields) {
  return Object.fromEntries(Object.entries(fields).filter(([, v]) => v !== undefined && v !== null));
}

function errorOf(msg) {
  const err = msg.error || {};
  return new WarmexecError(err.code || "INTERNAL", err.message || "");
}

export class Client {
  constructor(endpoint) {
    this.sock = new Dealer({ linger: 0 });
    this.sock.connect(endpoint);
    this.nextId = 1;
    this.waiters = new Map(); // request id -> resolve
    this.streams = new Map(); // request id -> ExecStream
    this.reading = this.#readLoop();
  }

  async #readLoop() {
    try {
      for await (const [frame] of this.sock) {
        const msg = decode(frame, { useBigInt64: false });
        const stream = this.streams.get(msg.id);
        if (stream) {
          stream.push(msg);
          continue;
        }
        const resolve = this.waiters.get(msg.id);
        if (resolve) {
          this.waiters.delete(msg.id);
          resolve(msg);
        }
      }
    } catch (err) {
      if (!this.sock.closed) throw err;
    }
  }

  send(op, fields = {}) {
    const id = this.nextId++;
    this.sock.send(encode(compact({ v: 1, id, op, ...fields })));
    return id;
  }

  /** One request, its reply; an error reply rejects. */
  call(op, fields = {}) {
    return new Promise((resolve, reject) => {
      const id = this.send(op, fields);
      this.waiters.set(id, (msg) => (msg.ok ? resolve(msg) : reject(errorOf(msg))));
    });
  }

  exec(container, argv, opts = {}) {
    return this.call("exec", { container, argv, ...opts });
  }

  /** A streamed exec: opts as the exec request's (interactive, window, grace, user, ...). */
  stream(container, argv, opts = {}) {
    const window = opts.window ?? DEFAULT_WINDOW;
    const id = this.nextId; // the id send() is about to take
    const s = new ExecStream(this, id, window);
    this.streams.set(id, s);
    this.send("exec", { container, argv, stream: true, ...opts, window });
    return s;
  }

  close() {
    for (const s of this.streams.values()) s.stopHeart();
    this.sock.close();
  }
}

export class ExecStream {
  constructor(client, id, window) {
    this.client = client;
    this.id = id;
    this.window = window;
    this.queue = [];
    this.wake = null;
    this.owed = 0;
    this.execId = null;
    this.pid = null;
    this.result = null;
    this.heart = null;
  }

  push(msg) {
    this.queue.push(msg);
    if (this.wake) {
      const wake = this.wake;
      this.wake = null;
      wake();
    }
  }

  notify(op, fields) {
    this.client.send(op, { exec_id: this.execId, ...fields });
  }

  stopHeart() {
    if (this.heart) clearInterval(this.heart);
    this.heart = null;
  }

  /** The events, in order: {event: "started"|"output"|"exit", ...}; an error throws. */
  async *events() {
    while (this.result === null) {
      if (!this.queue.length) {
        await new Promise((resolve) => { this.wake = resolve; });
        continue;
      }
      const msg = this.queue.shift();
      if (!msg.ok) {
        this.end();
        throw errorOf(msg);
      }
      if (msg.event === "started") {
        this.execId = msg.exec_id;
        this.pid = msg.pid;
        this.heart = setInterval(() => this.notify("credit", { bytes: 0 }), HEARTBEAT_MS);
      } else if (msg.event === "output") {
        this.owed += msg.data.length;
        if (this.owed >= Math.max(1, this.window >> 2)) {
          this.notify("credit", { bytes: this.owed });
          this.owed = 0;
        }
      } else if (msg.event === "exit") {
        this.result = msg;
        this.end();
      }
      yield msg;
    }
  }

  end() {
    this.stopHeart();
    this.client.streams.delete(this.id);
  }

  /** Send bytes to an interactive exec's stdin; resolves once they are in its pipe. */
  stdin(data, eof = false) {
    return this.client.call("stdin", { exec_id: this.execId, data, eof: eof || undefined });
  }

  signal(sig = "KILL", group = false) {
    return this.client.call("signal", { exec_id: this.execId, signal: sig, group: group || undefined });
  }

  resize(rows, cols) {
    return this.client.call("resize", { exec_id: this.execId, rows, cols });
  }
}
