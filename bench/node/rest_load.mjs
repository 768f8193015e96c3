// A REST load client we did not write the HTTP of: Node's built-in http module.
//
// For bench/rest.py, the same protocol as bench/rest_client.py: --streams workers,
// each on its own keep-alive connection (an http.Agent with keepAlive and maxSockets
// = streams), looping POST <path> with stream: true and stream_options.include_usage,
// reading the SSE response to `data: [DONE]` and its end. Per request: the time to
// first byte (req.end() -> the first whole SSE event in a 'data' event) and every
// inter-chunk gap (events arriving in one 'data' event count a gap of 0), kept in the
// buckets of relay.loadgen.LatencyHistogram (1 % wide, from 1 us) so bench/rest.py
// reads both clients alike. Worker i starts i/N of --stagger-ms late. Bounded:
// --warmup-s, --duration-s measured, at most --drain-s for requests in flight,
// --max-requests in all, --request-timeout-s each.
// JSON lines on stdout: ready, window_start, window_end, result.
import http from 'node:http';
import { parseArgs } from 'node:util';

const { values: opts } = parseArgs({
  options: {
    port: { type: 'string' },
    path: { type: 'string', default: '/v1/chat/completions' },
    key: { type: 'string' },
    model: { type: 'string', default: 'gpt-4o-mini' },
    streams: { type: 'string', default: '4' },
    'warmup-s': { type: 'string', default: '1' },
    'duration-s': { type: 'string', default: '3' },
    'stagger-ms': { type: 'string', default: '20' },
    'drain-s': { type: 'string', default: '5' },
    'max-requests': { type: 'string', default: '1000000' },
    'request-timeout-s': { type: 'string', default: '30' },
  },
});
const port = Number(opts.port);
const streams = Number(opts.streams);
const warmupMs = Number(opts['warmup-s']) * 1000;
const durationMs = Number(opts['duration-s']) * 1000;
const staggerMs = Number(opts['stagger-ms']);
const drainMs = Number(opts['drain-s']) * 1000;
const maxRequests = Number(opts['max-requests']);
const timeoutMs = Number(opts['request-timeout-s']) * 1000;

const SMALLEST_MS = 0.001;
const INV_LOG_GROWTH = 1 / Math.log(1.01);

class Histogram {
  constructor() {
    this.counts = new Map();
    this.maxMs = 0;
  }
  record(ms) {
    const index = ms <= SMALLEST_MS ? 0 : Math.floor(Math.log(ms / SMALLEST_MS) * INV_LOG_GROWTH);
    this.counts.set(index, (this.counts.get(index) ?? 0) + 1);
    if (ms > this.maxMs) this.maxMs = ms;
  }
  toWire() {
    return { counts: Object.fromEntries(this.counts), max_ms: this.maxMs };
  }
}

const emit = (event, fields = {}) => process.stdout.write(JSON.stringify({ event, ...fields }) + '\n');
const now = () => performance.now();
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

const body = JSON.stringify({
  model: opts.model,
  stream: true,
  stream_options: { include_usage: true },
  messages: [{ role: 'user', content: 'Say something short.' }],
});
const agent = new http.Agent({ keepAlive: true, maxSockets: streams, maxFreeSockets: streams });
const headers = {
  Authorization: `Bearer ${opts.key}`,
  'Content-Type': 'application/json',
  Accept: 'text/event-stream',
  'Content-Length': Buffer.byteLength(body),
};
const DONE = Buffer.from('data: [DONE]');
const EVENT_END = Buffer.from('\n\n');

const run = {
  recording: false,
  stopping: false,
  started: 0,
  requests: 0,
  chunks: 0,
  errors: {},
  ttfb: new Histogram(),
  gap: new Histogram(),
  inFlight: 0,
};
const error = (kind) => {
  if (run.recording) run.errors[kind] = (run.errors[kind] ?? 0) + 1;
};

function countEvents(chunk) {
  let count = 0;
  let at = chunk.indexOf(EVENT_END);
  while (at >= 0) {
    count += 1;
    at = chunk.indexOf(EVENT_END, at + 2);
  }
  return count;
}

// One request to its end; resolves true when it completed, false after an error.
function oneRequest() {
  return new Promise((resolve) => {
    let settled = false;
    const settle = (ok, kind) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      if (!ok) error(kind);
      resolve(ok);
    };
    const request = http.request(
      { host: '127.0.0.1', port, path: opts.path, method: 'POST', agent, headers },
      (response) => {
        if (response.statusCode !== 200) {
          response.resume();
          response.on('end', () => settle(false, `status_${response.statusCode}`));
          return;
        }
        let events = 0;
        let last = 0;
        let done = false;
        response.on('data', (chunk) => {
          const at = now();
          const count = countEvents(chunk);
          if (count === 0) return;
          if (run.recording) {
            if (events === 0) run.ttfb.record(at - sentAt);
            else run.gap.record(at - last);
            for (let i = 1; i < count; i += 1) run.gap.record(0);
            run.chunks += count;
          }
          events += count;
          last = at;
          if (!done && chunk.indexOf(DONE) >= 0) done = true;
        });
        response.on('end', () => settle(done, 'no_done'));
        response.on('error', () => settle(false, 'response_error'));
        response.on('aborted', () => settle(false, 'aborted'));
      },
    );
    const timer = setTimeout(() => {
      request.destroy();
      settle(false, 'timeout');
    }, timeoutMs);
    request.on('error', (err) => settle(false, err.code ?? 'request_error'));
    const sentAt = now();
    request.end(body);
  });
}

async function worker(_, index) {
  // Worker i starts i/N of --stagger-ms late, so the streams' chunks are not in phase.
  await sleep((staggerMs * index) / streams);
  while (!run.stopping && run.started < maxRequests) {
    run.started += 1;
    run.inFlight += 1;
    const ok = await oneRequest();
    run.inFlight -= 1;
    if (ok && run.recording) run.requests += 1;
    if (!ok) await sleep(50);
  }
}

emit('ready', { streams });
const workers = Array.from({ length: streams }, worker);
await sleep(warmupMs);
run.recording = true;
emit('window_start');
const windowStart = now();
await sleep(durationMs);
run.recording = false;
const windowS = (now() - windowStart) / 1000;
emit('window_end');
run.stopping = true;
await Promise.race([Promise.all(workers), sleep(drainMs)]);
emit('result', {
  streams,
  window_s: windowS,
  started: run.started,
  requests: run.requests,
  chunks: run.chunks,
  errors: run.errors,
  ttfb: run.ttfb.toWire(),
  gap: run.gap.toWire(),
  unfinished: run.inFlight,
});
agent.destroy();
process.exit(0);
