"""relay: a high-performance relay for the OpenAI Realtime API, on Trio.

Package layout (each module's docstring says what it owns):

- ``relay.protocol``: sans-I/O pieces shared by the relay, the simulator and the
  bench tools: event envelopes and error shapes, audio helpers, the RFC 6455
  frame codec, HTTP/1.1 upgrade handshakes.
- ``relay.net``: the thin Trio shell over sockets (non-blocking try-first I/O).
- ``relay.simulator``: a faithful stand-in for OpenAI's GA Realtime server.
- ``relay.dataplane``: the ``/v1/realtime`` relay itself.
- ``relay.control``: the HTTP control plane (quart-trio on hypercorn).
"""

__version__ = "0.1.0"
