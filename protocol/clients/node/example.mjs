// node example.mjs ENDPOINT CONTAINER [--window BYTES] [--stdin] -- CMD [ARG...]
//
// Runs CMD as a streamed exec and prints one JSON line per event on stdout (output
// data in base64), then exits with the command's exit code. --stdin sends our stdin to
// the command (interactive: true), at most STDIN_WINDOW bytes unanswered.

import { Client, STDIN_WINDOW } from "./warmexec.mjs";

const args = process.argv.slice(2);
const dash = args.indexOf("--");
if (dash < 2 || dash === args.length - 1) {
  console.error("usage: node example.mjs ENDPOINT CONTAINER [--window BYTES] [--stdin] -- CMD [ARG...]");
  process.exit(2);
}
const [endpoint, container, ...flags] = args.slice(0, dash);
const argv = args.slice(dash + 1);
const wi = flags.indexOf("--window");
const window = wi >= 0 ? Number(flags[wi + 1]) : undefined;
const interactive = flags.includes("--stdin");

async function feed(s) {
  const inflight = [];
  let unanswered = 0;
  for await (const chunk of process.stdin) {
    for (let i = 0; i < chunk.length; i += 256 << 10) {
      const part = chunk.subarray(i, i + (256 << 10));
      while (unanswered + part.length > STDIN_WINDOW) {
        const { size } = await inflight.shift();
        unanswered -= size;
      }
      unanswered += part.length;
      inflight.push(s.stdin(part).then(() => ({ size: part.length })));
    }
  }
  await Promise.all(inflight);
  await s.stdin(new Uint8Array(0), true);
}

const c = new Client(endpoint);
let code = 125;
try {
  const s = c.stream(container, argv, { window, interactive: interactive || undefined, timeout: 60 });
  for await (const ev of s.events()) {
    if (ev.event === "started") {
      console.log(JSON.stringify({ event: "started", exec_id: ev.exec_id, pid: ev.pid }));
      if (interactive) feed(s).catch((err) => console.error(`stdin: ${err.message}`));
    } else if (ev.event === "output") {
      const data = Buffer.from(ev.data).toString("base64");
      console.log(JSON.stringify({ event: "output", stream: ev.stream, seq: ev.seq, data }));
    } else if (ev.event === "exit") {
      console.log(JSON.stringify({ event: "exit", exit_code: ev.exit_code, signal: ev.signal }));
      code = ev.exit_code;
    }
  }
} catch (err) {
  console.error(`warmexec: ${err.message}`);
} finally {
  c.close();
}
process.exit(code);
