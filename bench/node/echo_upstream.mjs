// A stand-in for OpenAI's Realtime endpoint on the `ws` package: the upstream of every
// path bench/stranger.py measures.
//
// On each connection it sends one `session.created`, then, by --mode:
//   echo   (default) every message echoed back verbatim (text as text, binary as binary).
//   delta  every `input_audio_buffer.append` answered with one
//          `response.output_audio.delta` carrying the same audio, in OpenAI's shape and key
//          order (type, event_id, response_id, item_id, output_index, content_index,
//          delta): event_id is the append's own when it has one (so a client can match
//          the answer to its append), else a fresh `event_<n>`; one response and item per
//          connection. Any other message is echoed verbatim. A client offering the
//          subprotocol `relay.audio.v1` (docs/binary-audio.md) gets it selected and speaks
//          that contract: a binary message is audio and is answered with the same audio as
//          one binary frame; every delta goes out as a binary frame of its audio, after a
//          `relay.output_audio.start` marker before the first. Without the opt-in a binary
//          message gets an `error` event (`invalid_event`), as from a JSON-only server.
// Delta mode lets bench/stranger.py run the JSON and the binary client paths through the
// relay against one upstream, differing only on the client leg, and speaks the binary
// contract itself for the direct reference.
//
// Any path, query and Authorization is accepted. perMessageDeflate is off (OpenAI's
// endpoint negotiates none either).
//
// Usage: node echo_upstream.mjs --port PORT [--host 127.0.0.1] [--mode echo|delta]
//        [--cert FILE --key FILE]
// With --cert/--key it serves wss:// (TLS) for the relay's wss:// upstream path.
import { readFileSync } from "node:fs";
import { createServer as createHttpServer } from "node:http";
import { createServer as createHttpsServer } from "node:https";
import { parseArgs } from "node:util";
import { WebSocketServer } from "ws";

const { values } = parseArgs({
  options: {
    port: { type: "string" },
    host: { type: "string", default: "127.0.0.1" },
    mode: { type: "string", default: "echo" },
    cert: { type: "string" },
    key: { type: "string" },
  },
});
if (!values.port || !["echo", "delta"].includes(values.mode)) {
  console.error("echo_upstream: --port is required; --mode is echo or delta");
  process.exit(2);
}
const DELTA_MODE = values.mode === "delta";
const AUDIO_SUBPROTOCOL = "relay.audio.v1";

const server =
  values.cert && values.key
    ? createHttpsServer({ cert: readFileSync(values.cert), key: readFileSync(values.key) })
    : createHttpServer();
server.on("request", (_request, response) => {
  response.writeHead(426, { "content-type": "text/plain" });
  response.end("WebSocket only\n");
});

// Delta mode selects relay.audio.v1 when offered, else realtime; echo mode keeps ws's
// default (the first protocol offered), as it always did.
const handleProtocols = DELTA_MODE
  ? (protocols) =>
      protocols.has(AUDIO_SUBPROTOCOL) ? AUDIO_SUBPROTOCOL : protocols.has("realtime") && "realtime"
  : undefined;
const wss = new WebSocketServer({
  server,
  perMessageDeflate: false,
  maxPayload: 64 << 20,
  ...(handleProtocols ? { handleProtocols } : {}),
});

const APPEND_HEAD = Buffer.from('{"type":"input_audio_buffer.append"');
const EVENT_ID_KEY = Buffer.from('"event_id":"');
const AUDIO_KEY = Buffer.from('"audio":"');
const QUOTE = 34;
const DELTA_HEAD = Buffer.from('{"type":"response.output_audio.delta","event_id":"');
const DELTA_TAIL = Buffer.from('"}');
const NOT_AUDIO_ERROR = JSON.stringify({
  type: "error",
  event_id: "event_binary_refused",
  error: {
    type: "invalid_request_error",
    code: "invalid_event",
    message: "Binary frames are not supported; send JSON text events.",
    param: null,
    event_id: null,
  },
});

// The bytes between `"key":"` and the next quote, or null (no escapes in ids or base64).
function stringAfter(data, key, from) {
  const at = data.indexOf(key, from);
  if (at < 0) return null;
  const start = at + key.length;
  const end = data.indexOf(QUOTE, start);
  return end < 0 ? null : data.subarray(start, end);
}

// An append's (event_id or null, base64 audio) as Buffers, or null for any other message.
function appendParts(data) {
  if (data.length >= APPEND_HEAD.length && data.subarray(0, APPEND_HEAD.length).equals(APPEND_HEAD)) {
    const audio = stringAfter(data, AUDIO_KEY, APPEND_HEAD.length);
    if (audio !== null) return [stringAfter(data, EVENT_ID_KEY, APPEND_HEAD.length), audio];
  }
  let event;
  try {
    event = JSON.parse(data);
  } catch {
    return null;
  }
  if (event?.type !== "input_audio_buffer.append" || typeof event.audio !== "string") return null;
  const id = typeof event.event_id === "string" ? Buffer.from(event.event_id) : null;
  return [id, Buffer.from(event.audio, "latin1")];
}

let sessions = 0;
wss.on("connection", (socket) => {
  sessions += 1;
  const id = `sess_${sessions}`;
  socket.send(
    JSON.stringify({
      type: "session.created",
      event_id: `event_${id}`,
      session: { id: "sess_x", object: "realtime.session", type: "realtime", model: "gpt-realtime" },
    }),
  );
  if (!DELTA_MODE) {
    socket.on("message", (data, isBinary) => {
      socket.send(data, { binary: isBinary });
    });
  } else {
    const responseId = `resp_${sessions}`;
    const itemId = `item_${sessions}`;
    const middle = Buffer.from(
      `","response_id":"${responseId}","item_id":"${itemId}","output_index":0,"content_index":0,"delta":"`,
    );
    const binaryPath = socket.protocol === AUDIO_SUBPROTOCOL;
    let markerSent = false;
    let events = 0;
    const sendAudio = (pcm) => {
      if (!markerSent) {
        markerSent = true;
        socket.send(
          JSON.stringify({
            type: "relay.output_audio.start",
            response_id: responseId,
            item_id: itemId,
            output_index: 0,
            content_index: 0,
          }),
        );
      }
      socket.send(pcm, { binary: true });
    };
    socket.on("message", (data, isBinary) => {
      if (isBinary) {
        if (binaryPath && data.length > 0) sendAudio(data);
        else socket.send(NOT_AUDIO_ERROR);
        return;
      }
      const parts = appendParts(data);
      if (parts === null) {
        socket.send(data, { binary: false });
        return;
      }
      const [eventId, audio] = parts;
      if (binaryPath) {
        sendAudio(Buffer.from(audio.toString("latin1"), "base64"));
        return;
      }
      events += 1;
      const idBytes = eventId ?? Buffer.from(`event_${id}_${events}`);
      socket.send(Buffer.concat([DELTA_HEAD, idBytes, middle, audio, DELTA_TAIL]), { binary: false });
    });
  }
  socket.on("error", () => socket.terminate());
});

server.listen(Number(values.port), values.host);
for (const signal of ["SIGTERM", "SIGINT"]) {
  process.on(signal, () => {
    for (const client of wss.clients) client.terminate();
    server.close();
    process.exit(0);
  });
}
