"""OpenAI's Realtime client events: their types, their fields, and the items they carry.

This module owns the schema of what a client may send over the WebSocket, with
OpenAI's wording (see :mod:`relay.protocol.validation`):

- the client event types OpenAI supports (:data:`SUPPORTED_CLIENT_EVENT_TYPES`,
  the list its ``invalid_value`` error recites) and the top-level fields each may
  carry (:func:`check_event_fields`; others are ``unknown_parameter``);
- conversation items (:data:`ITEM`: messages by role and content type, function
  calls and outputs, MCP approval responses), with OpenAI's limits on item ids;
- the ``response`` parameters of ``response.create`` (:data:`RESPONSE_PARAMS`,
  including ``metadata``'s limits and ``item_reference`` inputs);
- small field checks shared by several events (:func:`required_item_id`).

The session config itself lives in :mod:`relay.protocol.session_config`. No I/O here.
"""

from __future__ import annotations

from typing import Any, Final

from relay.protocol import session_config as sc
from relay.protocol import validation as v
from relay.protocol.validation import ClientEventError

JSON = dict[str, Any]

SUPPORTED_CLIENT_EVENT_TYPES: Final = (
    "session.update",
    "session.close",
    "input_audio_buffer.append",
    "session.input_audio_buffer.append",
    "input_audio_buffer.commit",
    "input_audio_buffer.clear",
    "conversation.item.create",
    "conversation.item.truncate",
    "conversation.item.delete",
    "conversation.item.retrieve",
    "response.create",
    "response.cancel",
)

#: Item ids are at most 32 characters (OpenAI's limit as documented for client ids).
MAX_ITEM_ID_CHARS: Final = 32
#: ``metadata`` holds at most 16 pairs of strings up to 512 characters (OpenAI's limits).
MAX_METADATA_PAIRS: Final = 16
MAX_METADATA_VALUE_CHARS: Final = 512

#: Top-level fields each client event may carry (others: ``unknown_parameter``).
EVENT_FIELDS: Final[dict[str, frozenset[str]]] = {
    "session.update": frozenset({"type", "event_id", "session"}),
    "input_audio_buffer.append": frozenset({"type", "event_id", "audio"}),
    "input_audio_buffer.commit": frozenset({"type", "event_id"}),
    "input_audio_buffer.clear": frozenset({"type", "event_id"}),
    "conversation.item.create": frozenset({"type", "event_id", "item", "previous_item_id"}),
    "conversation.item.retrieve": frozenset({"type", "event_id", "item_id"}),
    "conversation.item.delete": frozenset({"type", "event_id", "item_id"}),
    "conversation.item.truncate": frozenset(
        {"type", "event_id", "item_id", "content_index", "audio_end_ms"}
    ),
    "response.create": frozenset({"type", "event_id", "response"}),
    "response.cancel": frozenset({"type", "event_id", "response_id"}),
    "session.close": frozenset({"type", "event_id"}),
    "session.input_audio_buffer.append": frozenset({"type", "event_id", "audio"}),
}


def check_event_fields(event: Any, event_type: str) -> None:
    allowed = EVENT_FIELDS.get(event_type)
    if allowed is None or not isinstance(event, dict):
        return
    for name in event:
        if name not in allowed:
            raise v.unknown(name)


def required_item_id(event: JSON) -> str:
    if "item_id" not in event:
        raise v.missing("item_id")
    item_id = event["item_id"]
    v.string()(item_id, "item_id")
    return str(item_id)


def metadata(value: Any, path: str) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise v.wrong_type(path, "an object", value)
    if len(value) > MAX_METADATA_PAIRS:
        raise ClientEventError(
            f"Invalid '{path}': too many properties. Expected an object with at most "
            f"{MAX_METADATA_PAIRS} properties, but got an object with {len(value)} properties "
            "instead.",
            code="object_above_max_properties",
            param=path,
        )
    for key, element in value.items():
        v.string(MAX_METADATA_VALUE_CHARS)(element, f"{path}.{key}")


_USER_CONTENT: Final = v.by_type(
    {
        "input_text": v.obj({"type": v.any_value, "text": v.string()}, required=("text",)),
        "input_audio": v.obj(
            {"type": v.any_value, "audio": v.string(), "transcript": v.nullable(v.string())}
        ),
        "input_image": v.obj(
            {"type": v.any_value, "image_url": v.string(), "detail": v.enum("auto", "low", "high")}
        ),
    }
)
_ASSISTANT_CONTENT: Final = v.by_type(
    {
        "output_text": v.obj({"type": v.any_value, "text": v.string()}),
        "output_audio": v.obj(
            {"type": v.any_value, "audio": v.string(), "transcript": v.nullable(v.string())}
        ),
    }
)
_SYSTEM_CONTENT: Final = v.by_type(
    {"input_text": v.obj({"type": v.any_value, "text": v.string()}, required=("text",))}
)
_CONTENT_BY_ROLE: Final[dict[str, v.Check]] = {
    "user": v.array(_USER_CONTENT),
    "assistant": v.array(_ASSISTANT_CONTENT),
    "system": v.array(_SYSTEM_CONTENT),
}
_ITEM_COMMON: Final[dict[str, v.Check]] = {
    "type": v.any_value,
    "id": v.string(MAX_ITEM_ID_CHARS),
    "object": v.enum("realtime.item"),
    "status": v.enum("completed", "incomplete", "in_progress"),
}


def _message_item(value: Any, path: str) -> None:
    v.obj(
        {**_ITEM_COMMON, "role": v.enum("user", "assistant", "system"), "content": v.any_value},
        required=("role", "content"),
    )(value, path)
    _CONTENT_BY_ROLE[value["role"]](value["content"], f"{path}.content")


_ITEM_VARIANTS: Final[dict[str, v.Check]] = {
    "message": _message_item,
    "function_call": v.obj(
        {**_ITEM_COMMON, "name": v.string(), "arguments": v.string(), "call_id": v.string()},
        required=("name", "arguments"),
    ),
    "function_call_output": v.obj(
        {**_ITEM_COMMON, "call_id": v.string(), "output": v.string()},
        required=("call_id", "output"),
    ),
    "mcp_approval_response": v.obj(
        {
            **_ITEM_COMMON,
            "approval_request_id": v.string(),
            "approve": v.boolean,
            "reason": v.nullable(v.string()),
        },
        required=("approval_request_id", "approve"),
    ),
}
ITEM: Final = v.by_type(_ITEM_VARIANTS)
_RESPONSE_INPUT_ITEM: Final = v.by_type(
    {
        **_ITEM_VARIANTS,
        "item_reference": v.obj({"type": v.any_value, "id": v.string()}, required=("id",)),
    }
)
RESPONSE_PARAMS: Final = v.obj(
    {
        "audio": v.obj({"output": v.obj({"format": sc.FORMAT, "voice": sc.VOICE})}),
        "conversation": v.nullable(v.string()),
        "input": v.array(_RESPONSE_INPUT_ITEM),
        "instructions": v.string(),
        "max_output_tokens": sc.max_output_tokens,
        "metadata": metadata,
        "output_modalities": sc.output_modalities,
        "parallel_tool_calls": v.boolean,
        "prompt": sc.PROMPT,
        "reasoning": sc.REASONING,
        "tool_choice": sc.TOOL_CHOICE,
        "tools": sc.TOOLS,
    }
)


__all__ = [
    "EVENT_FIELDS",
    "ITEM",
    "MAX_ITEM_ID_CHARS",
    "MAX_METADATA_PAIRS",
    "MAX_METADATA_VALUE_CHARS",
    "RESPONSE_PARAMS",
    "SUPPORTED_CLIENT_EVENT_TYPES",
    "check_event_fields",
    "metadata",
    "required_item_id",
]
