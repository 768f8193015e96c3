"""OpenAI's validation vocabulary: the error a refused request carries and its wording.

This module owns how OpenAI's Realtime API words a refusal, for WebSocket client
events and HTTP bodies alike:

- :class:`ClientEventError`, the fields of the ``error`` to answer with (message,
  ``code``, ``param``, ``type``);
- the sentences and codes of each kind of refusal: wrong type (``invalid_type``),
  missing or unknown parameter, value not among the supported ones
  (:func:`invalid_value`), string or array too long, number out of range;
- small composable checks (:data:`Check`: ``(value, path) -> None``, raising on
  the first offending field) from which :mod:`relay.protocol.session_config` and
  :mod:`relay.protocol.client_events` build OpenAI's schemas: :func:`string`,
  :func:`integer`, :func:`number`, :func:`enum`, :func:`nullable`, :func:`array`,
  :func:`obj`, :func:`by_type` (discriminated unions), :func:`string_or`.

No I/O here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any


class ClientEventError(Exception):
    """A client event OpenAI would refuse: the fields of the ``error`` event to answer with."""

    def __init__(
        self,
        message: str,
        *,
        code: str | None,
        param: str | None = None,
        error_type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param
        self.error_type = error_type


#: A check of one JSON value at ``path`` (e.g. ``session.audio.input``); raises on refusal.
Check = Callable[[Any, str], None]


def json_type_name(value: object) -> str:
    """How OpenAI names a JSON value's type in errors: "a string", "an integer", "null"..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def wrong_type(path: str, expected: str, value: object) -> ClientEventError:
    got = json_type_name(value)
    return ClientEventError(
        f"Invalid type for '{path}': expected {expected}, but got {got} instead.",
        code="invalid_type",
        param=path,
    )


def _supported_list(values: tuple[str, ...]) -> str:
    """OpenAI's enumeration: 'a', 'a' and 'b', or 'a', 'b', and 'c'."""
    quoted = [f"'{value}'" for value in values]
    if len(quoted) == 1:
        return quoted[0]
    if len(quoted) == 2:
        return f"{quoted[0]} and {quoted[1]}"
    return ", ".join(quoted[:-1]) + f", and {quoted[-1]}"


def invalid_value(value: object, supported: tuple[str, ...], path: str) -> ClientEventError:
    """``invalid_value`` with OpenAI's "Supported values are" sentence."""
    return ClientEventError(
        f"Invalid value: '{value}'. Supported values are: {_supported_list(supported)}.",
        code="invalid_value",
        param=path,
    )


def missing(path: str) -> ClientEventError:
    return ClientEventError(
        f"Missing required parameter: '{path}'.", code="missing_required_parameter", param=path
    )


def unknown(path: str) -> ClientEventError:
    return ClientEventError(f"Unknown parameter: '{path}'.", code="unknown_parameter", param=path)


def any_value(value: Any, path: str) -> None:
    del value, path


def string(max_chars: int | None = None) -> Check:
    def check(value: Any, path: str) -> None:
        if not isinstance(value, str):
            raise wrong_type(path, "a string", value)
        if max_chars is not None and len(value) > max_chars:
            raise ClientEventError(
                f"Invalid '{path}': string too long. Expected a string with maximum length "
                f"{max_chars}, but got a string with length {len(value)} instead.",
                code="string_above_max_length",
                param=path,
            )

    return check


def boolean(value: Any, path: str) -> None:
    if not isinstance(value, bool):
        raise wrong_type(path, "a boolean", value)


def _bounds(
    value: float, path: str, minimum: float | None, maximum: float | None, noun: str
) -> None:
    """OpenAI's range errors: ``<noun>_below_min_value`` / ``<noun>_above_max_value``."""
    if minimum is not None and value < minimum:
        raise ClientEventError(
            f"Invalid '{path}': {noun} below minimum value. Expected a value >= "
            f"{minimum}, but got {value} instead.",
            code=f"{noun}_below_min_value",
            param=path,
        )
    if maximum is not None and value > maximum:
        raise ClientEventError(
            f"Invalid '{path}': {noun} above maximum value. Expected a value <= "
            f"{maximum}, but got {value} instead.",
            code=f"{noun}_above_max_value",
            param=path,
        )


def integer(minimum: int | None = None, maximum: int | None = None) -> Check:
    def check(value: Any, path: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong_type(path, "an integer", value)
        _bounds(value, path, minimum, maximum, "integer")

    return check


def number(minimum: float | None = None, maximum: float | None = None) -> Check:
    def check(value: Any, path: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise wrong_type(path, "a number", value)
        _bounds(value, path, minimum, maximum, "decimal")

    return check


def enum(*values: str) -> Check:
    def check(value: Any, path: str) -> None:
        if not isinstance(value, str):
            raise wrong_type(path, "a string", value)
        if value not in values:
            raise invalid_value(value, values, path)

    return check


def nullable(inner: Check) -> Check:
    def check(value: Any, path: str) -> None:
        if value is not None:
            inner(value, path)

    return check


def array(item: Check, max_items: int | None = None) -> Check:
    def check(value: Any, path: str) -> None:
        if not isinstance(value, list):
            raise wrong_type(path, "an array", value)
        if max_items is not None and len(value) > max_items:
            raise ClientEventError(
                f"Invalid '{path}': array too long. Expected an array with maximum length "
                f"{max_items}, but got an array with length {len(value)} instead.",
                code="array_above_max_length",
                param=path,
            )
        for index, element in enumerate(value):
            item(element, f"{path}[{index}]")

    return check


def obj(
    fields: Mapping[str, Check], *, required: tuple[str, ...] = (), open_ended: bool = False
) -> Check:
    """An object: required fields first, then unknown fields, then each field's check."""

    def check(value: Any, path: str) -> None:
        if not isinstance(value, dict):
            raise wrong_type(path, "an object", value)
        for name in required:
            if name not in value:
                raise missing(f"{path}.{name}")
        for name, element in value.items():
            field_check = fields.get(name)
            if field_check is None:
                if open_ended:
                    continue
                raise unknown(f"{path}.{name}")
            field_check(element, f"{path}.{name}")

    return check


def by_type(variants: Mapping[str, Check]) -> Check:
    """An object whose ``type`` picks the variant (OpenAI's discriminated unions)."""
    names = tuple(variants)

    def check(value: Any, path: str) -> None:
        if not isinstance(value, dict):
            raise wrong_type(path, "an object", value)
        if "type" not in value:
            raise missing(f"{path}.type")
        kind = value["type"]
        if not isinstance(kind, str):
            raise wrong_type(f"{path}.type", "a string", kind)
        variant = variants.get(kind)
        if variant is None:
            raise invalid_value(kind, names, f"{path}.type")
        variant(value, path)

    return check


def string_or(inner: Check, *, allowed: tuple[str, ...] | None = None) -> Check:
    """A string (optionally one of ``allowed``) or whatever ``inner`` accepts."""

    def check(value: Any, path: str) -> None:
        if isinstance(value, str):
            if allowed is not None and value not in allowed:
                raise invalid_value(value, allowed, path)
            return
        inner(value, path)

    return check


__all__ = [
    "Check",
    "ClientEventError",
    "any_value",
    "array",
    "boolean",
    "by_type",
    "enum",
    "integer",
    "invalid_value",
    "json_type_name",
    "missing",
    "nullable",
    "number",
    "obj",
    "string",
    "string_or",
    "unknown",
    "wrong_type",
]
