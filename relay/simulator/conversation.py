"""A simulated session's conversation: its items, their order, and what they retain.

This module owns the conversation as OpenAI's server keeps it:

- items (:class:`Item`): their wire form in OpenAI's shape, their kind, the audio
  they hold for ``conversation.item.retrieve`` (bounded by
  :data:`RETAINED_ITEM_AUDIO_MAX_BYTES` per session) and the tokens they add to a
  model context;
- the client events on items: ``conversation.item.create`` (with
  ``previous_item_id``), ``.retrieve``, ``.delete`` and ``.truncate``, each
  answered with OpenAI's events or its refusal;
- a committed user turn (:meth:`Conversation.commit_user_audio`): the
  ``input_audio_buffer.committed`` and item events, then the input transcription
  (canned words, with the usage OpenAI reports for whisper-1 or token models).

Events go out through the session's :class:`relay.simulator.outbox.Outbox`.
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass
from typing import Any, Final, Literal

from relay.protocol import audio
from relay.protocol import validation as v
from relay.protocol.client_events import ITEM, required_item_id
from relay.protocol.events import IdFactory
from relay.protocol.validation import ClientEventError
from relay.simulator.generated import (
    ANSWER_WORDS_PER_S,
    CANNED_USER_SENTENCES,
    INPUT_AUDIO_MS_PER_TOKEN,
    ITEM_OVERHEAD_TOKENS,
    OUTPUT_AUDIO_MS_PER_TOKEN,
    canned_words,
    text_tokens,
)
from relay.simulator.outbox import Outbox

JSON = dict[str, Any]

#: Committed user audio kept for ``conversation.item.retrieve``; items past this keep none.
RETAINED_ITEM_AUDIO_MAX_BYTES: Final = 64 * 1024 * 1024

ItemKind = Literal[
    "user_audio",
    "user_text",
    "assistant",
    "system",
    "function_call",
    "function_call_output",
    "other",
]


@dataclass(slots=True)
class Item:
    """One conversation item: its wire form plus what usage and retrieval need."""

    item_id: str
    kind: ItemKind
    wire: JSON
    audio_ms: float = 0.0
    #: Retained audio bytes (user audio, assistant audio) for conversation.item.retrieve.
    audio_bytes: bytes | None = None
    audio_format: str = "audio/pcm"

    def context_tokens(self) -> tuple[int, int]:
        """(text tokens, audio tokens) this item adds to a model context."""
        text = ITEM_OVERHEAD_TOKENS
        audio_tokens = 0
        if self.kind == "user_audio":
            audio_tokens = math.ceil(self.audio_ms / INPUT_AUDIO_MS_PER_TOKEN)
        elif self.kind == "assistant" and self.audio_ms:
            audio_tokens = math.ceil(self.audio_ms / OUTPUT_AUDIO_MS_PER_TOKEN)
        else:
            text += text_tokens(_item_text(self.wire))
        return text, audio_tokens


def _item_text(wire: JSON) -> str:
    """The words an item puts in the context: texts, transcripts, call outputs."""
    parts = [str(wire.get(name) or "") for name in ("output", "arguments")]
    parts.extend(
        str(part.get("text") or part.get("transcript") or "") for part in wire.get("content") or []
    )
    return " ".join(part for part in parts if part)


class Conversation:
    """The items of one session, in order, and the client events that change them."""

    def __init__(self, outbox: Outbox, *, rng: random.Random, id_factory: IdFactory) -> None:
        self._outbox = outbox
        self._rng = rng
        self._new_id = id_factory
        self.items: list[Item] = []
        self._items_by_id: dict[str, Item] = {}
        self._retained_audio_bytes = 0

    def last_item_id(self) -> str | None:
        return self.items[-1].item_id if self.items else None

    def append(self, item: Item) -> None:
        self._insert_item(item, len(self.items))

    def _insert_item(self, item: Item, index: int) -> None:
        self.items.insert(index, item)
        self._items_by_id[item.item_id] = item

    def retain(self, data: bytes) -> bool:
        """Count ``data`` as retained item audio if the session's budget allows."""
        if self._retained_audio_bytes + len(data) > RETAINED_ITEM_AUDIO_MAX_BYTES:
            return False
        self._retained_audio_bytes += len(data)
        return True

    def commit_user_audio(
        self,
        item_id: str,
        segment: bytes,
        duration: float,
        *,
        input_format: str,
        transcription: JSON | None,
    ) -> None:
        """A user turn is committed: its events, its item, then its transcription if on."""
        previous = self.last_item_id()
        self._outbox.emit(
            "input_audio_buffer.committed", {"previous_item_id": previous, "item_id": item_id}
        )
        wire: JSON = {
            "id": item_id,
            "type": "message",
            "status": "completed",
            "role": "user",
            "content": [{"type": "input_audio", "transcript": None}],
        }
        keep = segment if self.retain(segment) else None
        item = Item(
            item_id,
            "user_audio",
            wire,
            audio_ms=duration,
            audio_bytes=keep or None,
            audio_format=input_format,
        )
        self.append(item)
        self._outbox.emit("conversation.item.added", {"previous_item_id": previous, "item": wire})
        self._outbox.emit("conversation.item.done", {"previous_item_id": previous, "item": wire})
        if transcription is not None:
            self._transcribe(item, transcription)

    def _transcribe(self, item: Item, transcription: JSON) -> None:
        """Input transcription events: deltas, then completed with usage (canned words)."""
        word_count = max(1, round(item.audio_ms / 1000 * ANSWER_WORDS_PER_S))
        words = canned_words(CANNED_USER_SENTENCES, word_count, self._rng.randrange(100))
        for word in words:
            self._outbox.emit(
                "conversation.item.input_audio_transcription.delta",
                {
                    "item_id": item.item_id,
                    "content_index": 0,
                    "delta": word,
                    "obfuscation": self._outbox.ids.obfuscation(word),
                },
            )
        transcript = "".join(words)
        usage: JSON
        if transcription.get("model") == "whisper-1":
            usage = {"type": "duration", "seconds": round(item.audio_ms / 1000, 3)}
        else:
            audio_tokens = math.ceil(item.audio_ms / INPUT_AUDIO_MS_PER_TOKEN)
            output_tokens = text_tokens(transcript)
            usage = {
                "type": "tokens",
                "total_tokens": audio_tokens + output_tokens,
                "input_tokens": audio_tokens,
                "input_token_details": {"text_tokens": 0, "audio_tokens": audio_tokens},
                "output_tokens": output_tokens,
            }
        item.wire["content"][0]["transcript"] = transcript
        self._outbox.emit(
            "conversation.item.input_audio_transcription.completed",
            {"item_id": item.item_id, "content_index": 0, "transcript": transcript, "usage": usage},
        )

    # --- client events ------------------------------------------------------------

    def on_create(self, event: JSON, input_format: str) -> None:
        if "item" not in event:
            raise v.missing("item")
        raw = event["item"]
        ITEM(raw, "item")
        previous_id = event.get("previous_item_id")
        if previous_id is not None:
            v.string()(previous_id, "previous_item_id")
        if previous_id == "root":
            index, previous = 0, None
        elif previous_id:
            target = self._items_by_id.get(previous_id)
            if target is None:
                # [unconfirmed wording] OpenAI refuses unknown previous_item_id values.
                raise ClientEventError(
                    f"Error adding item: the previous item with id '{previous_id}' does not exist.",
                    code="item_create_invalid_previous_item_id",
                    param="previous_item_id",
                )
            index, previous = self.items.index(target) + 1, previous_id
        else:
            index = len(self.items)
            previous = self.last_item_id()
        item = self.item_from_client(raw, input_format)
        self._insert_item(item, index)
        self._outbox.emit(
            "conversation.item.added", {"previous_item_id": previous, "item": item.wire}
        )
        self._outbox.emit(
            "conversation.item.done", {"previous_item_id": previous, "item": item.wire}
        )

    def item_from_client(self, raw: JSON, input_format: str) -> Item:
        """The server's representation of a client item (ids and status filled in)."""
        item_id = raw.get("id") or self._new_id("item_")
        kind_name = raw["type"]
        if kind_name == "message":
            role = raw["role"]
            content: list[JSON] = []
            audio_ms = 0.0
            audio_bytes: bytes | None = None
            for part in raw["content"]:
                part_type = part["type"]
                if part_type == "input_audio":
                    decoded = _decode_item_audio(part.get("audio"))
                    audio_ms += len(decoded) / audio.bytes_per_ms(input_format)
                    audio_bytes = (audio_bytes or b"") + decoded
                    content.append({"type": "input_audio", "transcript": part.get("transcript")})
                elif part_type == "output_audio":
                    content.append({"type": "output_audio", "transcript": part.get("transcript")})
                else:
                    content.append(copy.deepcopy(part))
            wire: JSON = {
                "id": item_id,
                "type": "message",
                "status": "completed",
                "role": role,
                "content": content,
            }
            kind: ItemKind
            if role == "user":
                kind = "user_audio" if audio_ms else "user_text"
            elif role == "assistant":
                kind = "assistant"
            else:
                kind = "system"
            return Item(
                item_id,
                kind,
                wire,
                audio_ms=audio_ms,
                audio_bytes=audio_bytes,
                audio_format=input_format,
            )
        wire = {"id": item_id, **{k: copy.deepcopy(value) for k, value in raw.items() if k != "id"}}
        wire.setdefault("status", "completed")
        kind = kind_name if kind_name in ("function_call", "function_call_output") else "other"
        return Item(item_id, kind, wire)

    def on_retrieve(self, event: JSON) -> None:
        item_id = required_item_id(event)
        item = self._items_by_id.get(item_id)
        if item is None:
            raise ClientEventError(
                f"Error retrieving item: the item with id '{item_id}' does not exist.",
                code="item_retrieve_invalid_item_id",
            )
        wire = copy.deepcopy(item.wire)
        if item.audio_bytes is not None:
            # Retrieval includes the audio bytes, unlike item.added/done.
            for part in wire.get("content", []):
                if part.get("type") in ("input_audio", "output_audio"):
                    part["audio"] = audio.b64encode(item.audio_bytes)
                    break
        self._outbox.emit("conversation.item.retrieved", {"item": wire})

    def on_delete(self, event: JSON) -> None:
        item_id = required_item_id(event)
        item = self._items_by_id.pop(item_id, None)
        if item is None:
            raise ClientEventError(
                f"Error deleting item: the item with id '{item_id}' does not exist.",
                code="item_delete_invalid_item_id",
            )
        self.items = [kept for kept in self.items if kept.item_id != item_id]
        if item.audio_bytes is not None:
            self._retained_audio_bytes -= len(item.audio_bytes)
        self._outbox.emit("conversation.item.deleted", {"item_id": item_id})

    def on_truncate(self, event: JSON) -> None:
        item_id = required_item_id(event)
        for name in ("content_index", "audio_end_ms"):
            if name not in event:
                raise v.missing(name)
            v.integer(0)(event[name], name)
        content_index: int = event["content_index"]
        audio_end_ms: int = event["audio_end_ms"]
        item = self._items_by_id.get(item_id)
        if item is None:
            # [unconfirmed wording] The code is the one clients see live.
            raise ClientEventError(
                f"Error truncating item: the item with id '{item_id}' does not exist.",
                code="item_truncate_invalid_item_id",
            )
        content = item.wire.get("content") or []
        if (
            item.kind != "assistant"
            or content_index >= len(content)
            or content[content_index].get("type") != "output_audio"
        ):
            raise ClientEventError(
                "Only the audio content of assistant message items can be truncated.",
                code="invalid_value",
                param="content_index",
            )
        if audio_end_ms > item.audio_ms:
            raise ClientEventError(
                f"Audio content of {item.audio_ms:.0f}ms is already shorter than {audio_end_ms}ms",
                code="invalid_value",
                param="audio_end_ms",
            )
        item.audio_ms = float(audio_end_ms)
        if item.audio_bytes is not None:
            rate = audio.bytes_per_ms(item.audio_format)
            item.audio_bytes = item.audio_bytes[: audio_end_ms * rate]
        # OpenAI drops the transcript so the context holds no text the user never heard.
        content[content_index]["transcript"] = ""
        self._outbox.emit(
            "conversation.item.truncated",
            {"item_id": item_id, "content_index": content_index, "audio_end_ms": audio_end_ms},
        )

    def context_items(self, params: JSON, input_format: str) -> list[Item]:
        """The items a response reads: the conversation, or the response's own ``input``."""
        if "input" not in params:
            return list(self.items)
        items: list[Item] = []
        for raw in params["input"]:
            if raw["type"] == "item_reference":
                found = self._items_by_id.get(raw["id"])
                if found is not None:
                    items.append(found)
            else:
                items.append(self.item_from_client(raw, input_format))
        return items


def _decode_item_audio(text: str | None) -> bytes:
    if not text:
        return b""
    try:
        return audio.b64decode(text)
    except ValueError:
        raise ClientEventError(
            "Invalid 'item.content.audio'. Expected base64-encoded audio bytes.",
            code="invalid_value",
            param="item.content.audio",
        ) from None


__all__ = [
    "RETAINED_ITEM_AUDIO_MAX_BYTES",
    "Conversation",
    "Item",
    "ItemKind",
]
