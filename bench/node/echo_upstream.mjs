// A stand-in for OpenAI's Realtime endpoint on the `ws` package: the upstream of every
// path bench/stranger.py measures.
//
// On each connection it sends one `session.created`, then echoes every message back
// verbatim (text as text, binary as binary). Any path, query and Authorization is
// accepted. perMessageDeflate is off (OpenAI's endpoint negotiates none either).
//
// Usage: node echo_upstream.mjs --port PORT [--host 127.0.0.1] [--cert FILE --key FILE]
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
    cert: { type: "string" },
    key: { type: "string" },
  },
});
if (!values.port) {
  console.error("echo_upstream: --port is required");
  process.exit(2);
}

const server =
  values.cert && values.key
    ? createHttpsServer({ cert: readFileSync(values.cert), key: readFileSync(values.key) })
    : createHttpServer();
server.on("request", (_request, response) => {
  response.writeHead(426, { "content-type": "text/plain" });
  response.end("WebSocket only\n");
});

const wss = new WebSocketServer({ server, perMessageDeflate: false, maxPayload: 64 << 20 });
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
  socket.on("message", (data, isBinary) => {
    socket.send(data, { binary: isBinary });
  });
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
