// A load generator for Realtime-protocol WebSocket endpoints on the `ws` package: a
// client written by a stranger to our code (bench/stranger.py drives it).
//
// Modes:
//   stream  N sessions; session i first sends at i*period/N after the start, then every
//           period (rate/s in all, default 50/s = one append per 20 ms period). Every
//           append carries event_id evt_<session>_<seq>; the echo's event_id gives the
//           round trip (append sent -> echo received).
//   churn   `concurrency` loops, each: open a session, wait for session.created, send
//           K appends and await their echoes, close cleanly, repeat until the end.
//   idle    open N sessions, wait for session.created on each, print "ready", hold them
//           until stdin closes or a line "stop" arrives or the duration has passed.
//
// --binary: every session offers the subprotocol relay.audio.v1 (docs/binary-audio.md)
// beside realtime and fails (binary_audio_not_selected) when the server does not select
// it. Each append is then one binary message of the same 960 bytes of audio, its first 4
// bytes overwritten by the sequence number (little-endian); the answer is a binary frame
// of audio (after a relay.output_audio.start text marker), matched by the sequence number
// in it, as the JSON path matches the echo's event_id. A JSON delta is still accepted.
//
// stream reports the bytes on its sessions' sockets inside the window, both ways
// (client_bytes_sent / client_bytes_received: frame headers and every frame included),
// and the audio its appends carried in it (window_audio_s): the client leg's cost per
// second of audio, JSON against binary.
//
// Lines on stdout (JSON, one per line): {"event":"ready",...} once every session of
// stream/idle has opened (or failed), {"event":"window_start"} after the warmup,
// {"event":"window_end"}, then one {"event":"result",...}. Diagnostics go to stderr.
// ws masks every client frame with a fresh random mask (its default), as a browser does.
import { randomBytes } from "node:crypto";
import { performance } from "node:perf_hooks";
import { parseArgs } from "node:util";
import WebSocket from "ws";

const { values: opt } = parseArgs({
  options: {
    url: { type: "string" },
    key: { type: "string", default: "" },
    mode: { type: "string", default: "stream" },
    sessions: { type: "string", default: "50" },
    rate: { type: "string", default: "50" },
    "period-ms": { type: "string", default: "20" },
    "warmup-s": { type: "string", default: "2" },
    "duration-s": { type: "string", default: "6" },
    "open-concurrency": { type: "string", default: "32" },
    concurrency: { type: "string", default: "16" },
    exchanges: { type: "string", default: "5" },
    "grace-s": { type: "string", default: "2" },
    "open-timeout-s": { type: "string", default: "15" },
    binary: { type: "boolean", default: false },
  },
});
if (!opt.url || !["stream", "churn", "idle"].includes(opt.mode)) {
  console.error("loadgen: --url and --mode stream|churn|idle are required");
  process.exit(2);
}
const N = Number(opt.sessions);
const RATE = Number(opt.rate);
const PERIOD_MS = Number(opt["period-ms"]);
const WARMUP_MS = Number(opt["warmup-s"]) * 1000;
const DURATION_MS = Number(opt["duration-s"]) * 1000;
const OPEN_CONCURRENCY = Math.max(1, Number(opt["open-concurrency"]));
const CONCURRENCY = Math.max(1, Number(opt.concurrency));
const EXCHANGES = Math.max(1, Number(opt.exchanges));
const GRACE_MS = Number(opt["grace-s"]) * 1000;
const OPEN_TIMEOUT_MS = Number(opt["open-timeout-s"]) * 1000;
const SATURATED_SHARE = 0.9;
const BINARY = opt.binary;
const AUDIO_SUBPROTOCOL = "relay.audio.v1";
// 20 ms of 24 kHz PCM16 per append.
const AUDIO_PCM = randomBytes(960);
const AUDIO_MS = 20;
const SEQUENCE_BYTES = 4;

const AUDIO = AUDIO_PCM.toString("base64");
const SUFFIX = `","audio":"${AUDIO}"}`;
const appendText = (session, seq) =>
  `{"type":"input_audio_buffer.append","event_id":"evt_${session}_${seq}${SUFFIX}`;
const EVENT_ID = Buffer.from('"event_id":"evt_');
const CREATED = Buffer.from('"session.created"');
const DELTA_TYPE = Buffer.from('"response.output_audio.delta"');

// One binary append: the audio with `seq` over its first bytes (a fresh buffer: ws masks
// in place what it is given).
function binaryAppend(seq) {
  const chunk = Buffer.allocUnsafe(AUDIO_PCM.length);
  AUDIO_PCM.copy(chunk);
  chunk.writeUInt32LE(seq, 0);
  return chunk;
}

// The sequence number a binary-path answer carries in its audio, or -1: a binary frame,
// or a JSON delta the server did not convert (its audio decoded); markers give -1.
function binarySeq(data, isBinary) {
  if (isBinary) return data.length >= SEQUENCE_BYTES ? data.readUInt32LE(0) : -1;
  if (data.indexOf(DELTA_TYPE) < 0) return -1;
  let event;
  try {
    event = JSON.parse(data);
  } catch {
    return -1;
  }
  const audio = typeof event.delta === "string" ? Buffer.from(event.delta, "base64") : null;
  return audio !== null && audio.length >= SEQUENCE_BYTES ? audio.readUInt32LE(0) : -1;
}

// Bytes on the sessions' sockets so far, both ways (net.Socket counters).
function socketBytes(sessions) {
  let sent = 0;
  let received = 0;
  for (const session of sessions) {
    const socket = session.ws._socket;
    if (!socket) continue;
    sent += socket.bytesWritten;
    received += socket.bytesRead;
  }
  return { sent, received };
}

const emit = (line) => process.stdout.write(`${JSON.stringify(line)}\n`);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, Math.max(0, ms)));

const errors = {};
const countError = (kind) => {
  errors[kind] = (errors[kind] || 0) + 1;
};

// The sequence number of an echoed append (evt_<session>_<seq>), or -1.
function echoedSeq(data) {
  const at = data.indexOf(EVENT_ID);
  if (at < 0) return -1;
  let i = data.indexOf(95 /* _ */, at + EVENT_ID.length);
  let seq = 0;
  for (i += 1; i < data.length; i += 1) {
    const c = data[i];
    if (c < 48 || c > 57) break;
    seq = seq * 10 + (c - 48);
  }
  return seq;
}

function percentiles(samples) {
  if (samples.length === 0) return { count: 0, p50: null, p90: null, p99: null, p999: null, max: null };
  const sorted = Float64Array.from(samples).sort();
  const at = (q) => sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))];
  return {
    count: sorted.length,
    p50: at(0.5),
    p90: at(0.9),
    p99: at(0.99),
    p999: at(0.999),
    max: sorted[sorted.length - 1],
  };
}

// One session: resolves once session.created has arrived; `onEcho(seq, now)` per echo.
class Session {
  constructor(index) {
    this.index = index;
    this.sendTimes = [];
    this.echoed = 0;
    this.closed = false;
    this.onEcho = null;
  }

  open() {
    return new Promise((resolve) => {
      const started = performance.now();
      let settled = false;
      const settle = (ok, kind) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        if (!ok) {
          countError(kind);
          this.ws.terminate();
        }
        resolve(ok ? performance.now() - started : null);
      };
      const timer = setTimeout(() => settle(false, "open_timeout"), OPEN_TIMEOUT_MS);
      this.ws = new WebSocket(opt.url, BINARY ? ["realtime", AUDIO_SUBPROTOCOL] : [], {
        headers: opt.key ? { Authorization: `Bearer ${opt.key}` } : {},
        perMessageDeflate: false,
        maxPayload: 64 << 20,
      });
      if (BINARY) {
        this.ws.on("open", () => {
          if (this.ws.protocol !== AUDIO_SUBPROTOCOL) settle(false, "binary_audio_not_selected");
        });
      }
      this.ws.on("unexpected-response", (_request, response) => {
        settle(false, `handshake_${response.statusCode}`);
      });
      this.ws.on("error", () => settle(false, "open_error"));
      this.ws.on("close", (code) => {
        this.closed = true;
        if (!settled) settle(false, `closed_${code}_before_created`);
      });
      this.ws.on("message", (data, isBinary) => {
        if (!settled) {
          if (!isBinary && data.indexOf(CREATED) >= 0) settle(true);
          return;
        }
        let seq;
        if (BINARY) seq = binarySeq(data, isBinary);
        else if (isBinary) return;
        else seq = echoedSeq(data);
        if (seq < 0) return;
        this.echoed += 1;
        if (this.onEcho) this.onEcho(seq, performance.now());
      });
    });
  }

  send(seq) {
    if (BINARY) this.ws.send(binaryAppend(seq), { binary: true });
    else this.ws.send(appendText(this.index, seq));
  }

  close() {
    return new Promise((resolve) => {
      if (this.closed || this.ws.readyState === WebSocket.CLOSED) {
        resolve();
        return;
      }
      const timer = setTimeout(() => {
        this.ws.terminate();
        resolve();
      }, 2000);
      this.ws.once("close", () => {
        clearTimeout(timer);
        resolve();
      });
      this.ws.close(1000);
    });
  }
}

// Open `count` sessions, at most OPEN_CONCURRENCY handshakes in flight.
async function openAll(count, handshakes) {
  const sessions = new Array(count);
  let next = 0;
  const worker = async () => {
    while (next < count) {
      const index = next;
      next += 1;
      const session = new Session(index);
      const took = await session.open();
      if (took !== null) {
        handshakes.push(took);
        sessions[index] = session;
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(OPEN_CONCURRENCY, count) }, worker));
  return sessions.filter(Boolean);
}

function loadCpu(before, wallMs) {
  const used = process.cpuUsage(before);
  const cpuS = (used.user + used.system) / 1e6;
  const share = wallMs > 0 ? cpuS / (wallMs / 1000) : 0;
  return { load_cpu_s: cpuS, load_cpu_percent: 100 * share, load_saturated: share >= SATURATED_SHARE };
}

// Start, window start and window end as performance.now() times, with the window lines;
// `onMark("start" | "end")` runs at each end of the window.
function windowTimes(start, onMark = () => {}) {
  const windowStart = start + WARMUP_MS;
  const windowEnd = windowStart + DURATION_MS;
  const marks = { cpuBefore: null, cpu: null };
  setTimeout(() => {
    marks.cpuBefore = process.cpuUsage();
    onMark("start");
    emit({ event: "window_start" });
  }, windowStart - performance.now());
  setTimeout(() => {
    marks.cpu = loadCpu(marks.cpuBefore, performance.now() - windowStart);
    onMark("end");
    emit({ event: "window_end" });
  }, windowEnd - performance.now());
  return { windowStart, windowEnd, marks };
}

async function stream() {
  const handshakes = [];
  const sessions = await openAll(N, handshakes);
  emit({ event: "ready", opened: sessions.length });
  const start = performance.now() + 50;
  const bytes = {};
  const { windowStart, windowEnd, marks } = windowTimes(start, (phase) => {
    bytes[phase] = socketBytes(sessions);
  });
  const perPeriod = (RATE * PERIOD_MS) / 1000;
  const rtts = [];
  let windowSent = 0;
  let windowReceived = 0;
  const inWindow = (t) => t >= windowStart && t < windowEnd;
  const senders = sessions.map((session, number) => {
    const sentInWindow = new Set();
    session.sentInWindow = sentInWindow;
    session.onEcho = (seq, now) => {
      if (inWindow(now)) windowReceived += 1;
      if (sentInWindow.delete(seq)) rtts.push(now - session.sendTimes[seq]);
    };
    return new Promise((resolve) => {
      let due = start + (number * PERIOD_MS) / Math.max(1, sessions.length);
      let credit = 0;
      const tick = () => {
        const now = performance.now();
        if (due >= windowEnd || session.closed) {
          if (session.closed) countError("closed_while_streaming");
          resolve();
          return;
        }
        credit += perPeriod;
        while (credit >= 1) {
          credit -= 1;
          const seq = session.sendTimes.length;
          const sentAt = performance.now();
          session.sendTimes.push(sentAt);
          if (inWindow(sentAt)) {
            windowSent += 1;
            sentInWindow.add(seq);
          }
          session.send(seq);
        }
        due += PERIOD_MS;
        setTimeout(tick, due - now);
      };
      setTimeout(tick, due - performance.now());
    });
  });
  await Promise.all(senders);
  await sleep(windowEnd - performance.now());
  // Every echo of a message sent in the window is awaited, until the grace has passed.
  const graceEnd = performance.now() + GRACE_MS;
  const missing = () => sessions.reduce((sum, s) => sum + s.sentInWindow.size, 0);
  while (missing() > 0 && performance.now() < graceEnd) await sleep(20);
  const lost = missing();
  const sent = sessions.reduce((sum, s) => sum + s.sendTimes.length, 0);
  const received = sessions.reduce((sum, s) => sum + s.echoed, 0);
  await Promise.all(sessions.map((s) => s.close()));
  return {
    sessions_opened: sessions.length,
    sent,
    received,
    window_sent: windowSent,
    window_received: windowReceived,
    lost,
    rtt_ms: percentiles(rtts),
    handshake_ms: percentiles(handshakes),
    client_bytes_sent: bytes.end ? bytes.end.sent - bytes.start.sent : null,
    client_bytes_received: bytes.end ? bytes.end.received - bytes.start.received : null,
    window_audio_s: (windowSent * AUDIO_MS) / 1000,
    ...marks.cpu,
  };
}

async function churn() {
  const handshakes = [];
  const start = performance.now() + 50;
  const { windowStart, windowEnd, marks } = windowTimes(start);
  const stopAt = windowEnd;
  let opened = 0;
  let completed = 0;
  let windowSent = 0;
  let windowReceived = 0;
  let sent = 0;
  let received = 0;
  let lost = 0;
  const inWindow = (t) => t >= windowStart && t < windowEnd;
  let counter = 0;
  const loop = async () => {
    await sleep(start - performance.now());
    while (performance.now() < stopAt) {
      const session = new Session(counter);
      counter += 1;
      const took = await session.open();
      if (took === null) {
        await sleep(50);
        continue;
      }
      opened += 1;
      if (inWindow(performance.now())) handshakes.push(took);
      let echoes = 0;
      const all = new Promise((resolve) => {
        session.onEcho = (_seq, now) => {
          echoes += 1;
          received += 1;
          if (inWindow(now)) windowReceived += 1;
          if (echoes === EXCHANGES) resolve(true);
        };
        session.ws.once("close", () => resolve(false));
      });
      for (let seq = 0; seq < EXCHANGES; seq += 1) {
        session.sendTimes.push(performance.now());
        if (inWindow(performance.now())) windowSent += 1;
        sent += 1;
        session.send(seq);
      }
      const timeout = sleep(Math.max(GRACE_MS, stopAt + GRACE_MS - performance.now())).then(() => false);
      const ok = await Promise.race([all, timeout]);
      if (!ok) {
        lost += EXCHANGES - echoes;
        countError("churn_incomplete");
      }
      await session.close();
      if (ok && inWindow(performance.now())) completed += 1;
    }
  };
  await Promise.all(Array.from({ length: CONCURRENCY }, loop));
  await sleep(windowEnd - performance.now());
  return {
    sessions_opened: opened,
    sessions_completed: completed,
    sent,
    received,
    window_sent: windowSent,
    window_received: windowReceived,
    lost,
    handshake_ms: percentiles(handshakes),
    ...marks.cpu,
  };
}

async function idle() {
  const handshakes = [];
  const before = process.cpuUsage();
  const started = performance.now();
  const sessions = await openAll(N, handshakes);
  emit({ event: "ready", opened: sessions.length });
  // Held until stdin says "stop" or closes, or the duration (a timeout here) has passed.
  await new Promise((resolve) => {
    const timer = setTimeout(resolve, DURATION_MS);
    process.stdin.setEncoding("utf8");
    process.stdin.on("data", (chunk) => {
      if (chunk.includes("stop")) resolve();
    });
    process.stdin.on("end", resolve);
    process.stdin.on("error", resolve);
  });
  const held = sessions.filter((s) => !s.closed).length;
  const cpu = loadCpu(before, performance.now() - started);
  await Promise.all(sessions.map((s) => s.close()));
  return {
    sessions_opened: sessions.length,
    sessions_held: held,
    sent: 0,
    received: 0,
    lost: 0,
    handshake_ms: percentiles(handshakes),
    ...cpu,
  };
}

const run = { stream, churn, idle }[opt.mode];
const result = await run();
const requested = opt.mode === "churn" ? CONCURRENCY : N;
emit({
  event: "result",
  mode: opt.mode,
  sessions_requested: requested,
  sessions_failed: Object.entries(errors)
    .filter(
      ([kind]) =>
        kind.startsWith("handshake_") ||
        kind.startsWith("open_") ||
        kind.includes("before_created") ||
        kind === "binary_audio_not_selected",
    )
    .reduce((sum, [, count]) => sum + count, 0),
  window_s: DURATION_MS / 1000,
  binary: BINARY,
  errors,
  ...result,
});
process.exit(0);
