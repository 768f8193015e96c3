// The relay a user would otherwise write in ~50 lines with Node's `ws` package: the
// `node-ws` baseline of bench/stranger.py.
//
// It accepts a client, dials --upstream (with its own bearer key) and relays messages
// both ways. Each text message is parsed with JSON.parse (as any relay that looks at
// events must) and then the ORIGINAL text is forwarded, not JSON.stringify of the parse:
// the parse is the work a real relay does, re-serialising would be extra work ours does
// not do for audio appends either. Binary messages pass as they are. When one leg
// closes, the other is closed. Client messages that arrive before the upstream is open
// are queued.
//
// Usage: node ws_relay.mjs --port PORT --upstream ws://127.0.0.1:P/v1 [--key sk-...]
import { parseArgs } from "node:util";
import WebSocket, { WebSocketServer } from "ws";

const { values } = parseArgs({
  options: {
    port: { type: "string" },
    upstream: { type: "string" },
    key: { type: "string", default: "sk-node-ws-relay" },
  },
});

const wss = new WebSocketServer({ host: "127.0.0.1", port: Number(values.port), perMessageDeflate: false });
wss.on("connection", (client, request) => {
  const query = request.url.includes("?") ? request.url.slice(request.url.indexOf("?")) : "";
  const upstream = new WebSocket(`${values.upstream}/realtime${query}`, {
    headers: { Authorization: `Bearer ${values.key}` },
    perMessageDeflate: false,
  });
  const pending = [];
  const relay = (to) => (data, isBinary) => {
    if (!isBinary) {
      try {
        JSON.parse(data.toString("utf8"));
      } catch {
        client.close(1003, "invalid JSON");
        return;
      }
    }
    if (to.readyState === WebSocket.OPEN) to.send(data, { binary: isBinary });
    else if (to === upstream && to.readyState === WebSocket.CONNECTING) pending.push([data, isBinary]);
  };
  upstream.on("open", () => {
    for (const [data, isBinary] of pending.splice(0)) upstream.send(data, { binary: isBinary });
  });
  client.on("message", relay(upstream));
  upstream.on("message", relay(client));
  const closeBoth = () => {
    if (client.readyState <= WebSocket.OPEN) client.close();
    if (upstream.readyState === WebSocket.OPEN) upstream.close();
    else if (upstream.readyState === WebSocket.CONNECTING) upstream.terminate();
  };
  client.on("close", closeBoth);
  upstream.on("close", closeBoth);
  client.on("error", closeBoth);
  upstream.on("error", closeBoth);
});
for (const signal of ["SIGTERM", "SIGINT"]) process.on(signal, () => process.exit(0));
