"""The browser voice page's static files: plain ES modules, no build step, no framework.

This package owns the page the control plane serves under ``/demo/`` when
``browser_demo_enabled`` is on (:mod:`relay.control.browser_demo` reads the files
from here with :mod:`importlib.resources`, so they ship inside the wheel):

- ``index.html``, ``style.css``: the page;
- ``main.js``: the flow (token, session, turns, barge-in, transcript, latency)
  and ``window.relayDemo``, the page's state for tests;
- ``realtime.js``: the WebSocket, on the ``relay.audio.v1`` binary path or the
  plain JSON path (docs/binary-audio.md);
- ``audio.js``: the AudioContext and its two worklets;
- ``capture-worklet.js``: microphone to 24 kHz PCM16 chunks;
- ``playback-worklet.js``: a bounded jitter buffer, upsampled to the device rate;
- ``resampler.js``: the streaming windowed-sinc resampler both worklets use;
- ``pcm.js``: base64 and PCM16 helpers.
"""
