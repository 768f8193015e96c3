"""The REST proxy: the rest of ``/v1`` through the same relay, streamed, accounted, routed.

:mod:`relay.rest.messages` is the sans-I/O core (which paths, which model, which
headers, where the upstream request goes, response framing, usage);
:mod:`relay.rest.pool` keeps upstream keep-alive connections; :mod:`relay.rest.proxy`
is the Trio shell that moves the bytes.
"""
