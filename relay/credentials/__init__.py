"""Credentials: everything that decides who may use the relay, in one package.

One module per concern:

- :mod:`~relay.credentials.tokens`: the relay token format (``ek_r1.…``), minting
  and verification, and the signing keyring. Sans-I/O.
- :mod:`~relay.credentials.keyfiles`: the app key file and the signing key file on
  disk (what ``relay keys`` writes) and the in-memory stores the relay serves from.
- :mod:`~relay.credentials.checkers`: the handshake's credential check (static client
  keys, no-auth, relay tokens) and the single-use replay store.
- :mod:`~relay.credentials.minting`: ``POST /v1/realtime/client_secrets`` decisions.

Nothing is re-exported here: import from the module that owns the name.
"""
