"""The :class:`Secret` type: credential text that never shows itself.

This module owns how a secret held in memory (an API key, a client key, a digest
an attacker could test guesses against) is kept from being displayed. A
:class:`Secret` is a ``str`` so everything that *uses* the value (hashing,
comparing, ``encode``, header validation) works unchanged, but ``str()``,
``repr()``, f-strings, ``format`` and ``%`` formatting all give
:data:`REDACTED`. Code that must put the value on the wire says so with
:meth:`Secret.reveal`.

It guards against accidental display, not deliberate use: string methods
(``upper``, slicing, ``+``) return plain ``str`` and carry the value. Configuration
fields typed ``Secret`` are what :func:`relay.config.redacted` hides, and
:mod:`relay.logs` writes a ``Secret`` found in structured fields as
:data:`REDACTED`.
"""

from __future__ import annotations

from typing import Final

#: What a secret looks like wherever it is displayed.
REDACTED: Final = "<redacted>"


class Secret(str):
    """A ``str`` whose ``str``/``repr``/``format`` never show the value."""

    __slots__ = ()

    def __new__(cls, value: str = "") -> Secret:
        if isinstance(value, Secret):
            return value  # str(value) would be REDACTED: never re-wrap through it
        return super().__new__(cls, value)

    def reveal(self) -> str:
        """The value itself, as a plain ``str``: for the one place it is sent."""
        return str.__str__(self)

    def __str__(self) -> str:
        return REDACTED

    def __repr__(self) -> str:
        return f"Secret({REDACTED!r})"

    def __format__(self, format_spec: str) -> str:
        return REDACTED
