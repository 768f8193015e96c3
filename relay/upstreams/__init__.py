"""Upstreams: several OpenAI, Azure OpenAI and compatible endpoints, chosen per session.

One module per concern, both sans-I/O (issue 14; not yet wired into the server):

- :mod:`~relay.upstreams.chooser`: which upstream and key a new session dials, in what
  order within one connect deadline, and the cool-downs and bad keys failed dials leave.
- :mod:`~relay.upstreams.urls`: the handshake target for each kind of upstream (OpenAI,
  Azure GA and preview, compatible): host, port, TLS, path and query, headers.
"""
