"""A streaming ``multipart/form-data`` reader (RFC 7578), sans-I/O: bytes in, parts out.

This module owns reading an upload such as ``POST /v1/audio/transcriptions`` without
holding it: :meth:`MultipartReader.feed` takes the body as it arrives and returns
:class:`PartStart`, :class:`PartData` and :class:`PartEnd` events; a part's data
is handed out as soon as it cannot be the start of the next boundary, so memory
is bounded by one read plus the delimiter, whatever the part's size. What to keep
of a part (a small field's value, a file's hash) is the caller's choice.

Part headers are bounded (:data:`MAX_PART_HEAD_BYTES`) and so are the parts
(:data:`MAX_PARTS`); anything malformed raises :class:`MultipartError`, whose
message never quotes the body.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

#: One part's header block (bytes): a Content-Disposition and a Content-Type fit easily.
MAX_PART_HEAD_BYTES: Final = 16 * 1024
#: Parts in one body: a transcription request has a handful of fields.
MAX_PARTS: Final = 256
#: Bytes skipped before the first boundary (RFC 2046's preamble) before giving up.
MAX_PREAMBLE_BYTES: Final = 64 * 1024
#: RFC 2046 §5.1.1: a boundary is 1 to 70 characters.
MAX_BOUNDARY_CHARS: Final = 70

_CRLF: Final = b"\r\n"
_HEAD_END: Final = b"\r\n\r\n"


class MultipartError(Exception):
    """The body is not the ``multipart/form-data`` its Content-Type announced."""


@dataclass(frozen=True, slots=True)
class PartStart:
    """A part begins: its form field ``name``, and ``filename`` for a file part."""

    name: str
    filename: str | None
    content_type: str


@dataclass(frozen=True, slots=True)
class PartData:
    data: bytes


@dataclass(frozen=True, slots=True)
class PartEnd:
    pass


MultipartEvent = PartStart | PartData | PartEnd


def boundary_of(content_type: str) -> bytes | None:
    """The boundary of a ``multipart/form-data`` Content-Type, or ``None`` if it is not one."""
    media_type, _, params = content_type.partition(";")
    if media_type.strip().lower() != "multipart/form-data":
        return None
    for name, value in _parameters(params):
        if name == "boundary" and 0 < len(value) <= MAX_BOUNDARY_CHARS and value.isascii():
            return value.encode("ascii")
    return None


class MultipartReader:
    """Feed the body in pieces; each :meth:`feed` returns the events it completed.

    States: ``preamble`` (before the first boundary), ``after`` (just past a
    boundary: ``--`` ends the body, CRLF starts a part), ``head`` (a part's
    headers), ``data`` (a part's content), ``done`` (the epilogue, ignored).
    """

    def __init__(self, boundary: bytes) -> None:
        # The body is read as if preceded by CRLF, so the first boundary is matched
        # by the same delimiter as every later one.
        self._delimiter = b"\r\n--" + boundary
        self._buffer = bytearray(_CRLF)
        self._state = "preamble"
        self._skipped = 0
        self._parts = 0

    @property
    def complete(self) -> bool:
        """The closing boundary has arrived."""
        return self._state == "done"

    def feed(self, data: bytes) -> list[MultipartEvent]:
        if self._state == "done":
            return []
        self._buffer += data
        events: list[MultipartEvent] = []
        while self._step(events):
            pass
        return events

    def _step(self, events: list[MultipartEvent]) -> bool:
        """Advance one state if the buffer allows it; ``False``: wait for more bytes."""
        buffer = self._buffer
        delimiter = self._delimiter
        if self._state == "preamble":
            index = buffer.find(delimiter)
            if index < 0:
                keep = len(delimiter) - 1
                self._skipped += max(0, len(buffer) - keep)
                if self._skipped > MAX_PREAMBLE_BYTES:
                    raise MultipartError("No multipart boundary found in the body.")
                del buffer[: max(0, len(buffer) - keep)]
                return False
            del buffer[: index + len(delimiter)]
            self._state = "after"
            return True
        if self._state == "after":
            if len(buffer) < len(_CRLF):
                return False
            marker = bytes(buffer[:2])
            if marker == b"--":
                self._state = "done"
                buffer.clear()
                return False
            if marker != _CRLF:
                raise MultipartError("Malformed multipart boundary line.")
            del buffer[:2]
            self._state = "head"
            return True
        if self._state == "head":
            if len(buffer) < len(_CRLF):
                return False
            if bytes(buffer[:2]) == _CRLF:
                # No headers at all: the blank line comes first.
                del buffer[:2]
                events.append(self._start(b""))
                return True
            end = buffer.find(_HEAD_END)
            if end < 0:
                if len(buffer) > MAX_PART_HEAD_BYTES:
                    raise MultipartError("Multipart part headers too large.")
                return False
            if end > MAX_PART_HEAD_BYTES:
                raise MultipartError("Multipart part headers too large.")
            head = bytes(buffer[:end])
            del buffer[: end + len(_HEAD_END)]
            events.append(self._start(head))
            return True
        if self._state == "data":
            index = buffer.find(delimiter)
            if index >= 0:
                if index:
                    events.append(PartData(bytes(buffer[:index])))
                del buffer[: index + len(delimiter)]
                events.append(PartEnd())
                self._state = "after"
                return True
            # Everything but a possible delimiter prefix at the end is content.
            safe = len(buffer) - (len(delimiter) - 1)
            if safe > 0:
                events.append(PartData(bytes(buffer[:safe])))
                del buffer[:safe]
            return False
        return False

    def _start(self, head: bytes) -> PartStart:
        self._parts += 1
        if self._parts > MAX_PARTS:
            raise MultipartError(f"More than {MAX_PARTS} multipart parts.")
        self._state = "data"
        name: str | None = None
        filename: str | None = None
        content_type = "text/plain"
        for line in head.split(_CRLF) if head else []:
            field, sep, value = line.decode("utf-8", "replace").partition(":")
            if not sep:
                raise MultipartError("Malformed multipart part header.")
            field = field.strip().lower()
            if field == "content-disposition":
                disposition, _, params = value.partition(";")
                if disposition.strip().lower() != "form-data":
                    raise MultipartError("A multipart part is not form-data.")
                for key, item in _parameters(params):
                    if key == "name":
                        name = item
                    elif key == "filename":
                        filename = item
            elif field == "content-type":
                content_type = value.strip()
        if name is None:
            raise MultipartError("A multipart part has no field name.")
        return PartStart(name=name, filename=filename, content_type=content_type)


def _parameters(text: str) -> list[tuple[str, str]]:
    """``; a=b; c="d \\" e"`` as ``[(a, b), (c, 'd " e')]`` (names lower-cased)."""
    out: list[tuple[str, str]] = []
    index = 0
    length = len(text)
    while index < length:
        while index < length and text[index] in " \t;":
            index += 1
        start = index
        while index < length and text[index] not in "=;":
            index += 1
        name = text[start:index].strip().lower()
        value = ""
        if index < length and text[index] == "=":
            index += 1
            if index < length and text[index] == '"':
                index += 1
                chars: list[str] = []
                while index < length and text[index] != '"':
                    if text[index] == "\\" and index + 1 < length:
                        index += 1
                    chars.append(text[index])
                    index += 1
                index += 1
                value = "".join(chars)
            else:
                start = index
                while index < length and text[index] != ";":
                    index += 1
                value = text[start:index].strip()
        if name:
            out.append((name, value))
    return out


__all__ = [
    "MAX_PARTS",
    "MAX_PART_HEAD_BYTES",
    "MultipartError",
    "MultipartEvent",
    "MultipartReader",
    "PartData",
    "PartEnd",
    "PartStart",
    "boundary_of",
]
