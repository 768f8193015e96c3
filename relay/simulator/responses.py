"""A simulated session's responses: planned, streamed in OpenAI's order, cancelled, counted.

This module owns ``response.create`` and ``response.cancel`` and everything a
response sends:

- the plan (:class:`ResponseRun`): modality, output format and voice, the words and
  audio chunks of the answer (:mod:`relay.simulator.generated`), cut to
  ``max_output_tokens``, and the usage of the context it reads (with prompt caching);
- the events, in the order OpenAI's server sends them: ``response.created``, the
  output item and content part, transcript (or text) deltas running slightly ahead
  of the audio deltas, then the ``.done`` events, ``response.done`` with a usage
  object whose numbers add up, and ``rate_limits.updated``; deltas paced at real
  time when configured;
- what the conversation keeps of a response once it is over (finished, cut, or
  cancelled by the client or by the user speaking): only what was sent.

Every event of a response carries a :class:`relay.simulator.outbox.Marker` naming
its run, so the outbox can report what was sent and a cancel can unschedule the rest.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from relay.config import SimulatorConfig
from relay.protocol import audio
from relay.protocol import validation as v
from relay.protocol.client_events import RESPONSE_PARAMS
from relay.protocol.events import IdFactory
from relay.protocol.session_config import normalized_format
from relay.protocol.validation import ClientEventError
from relay.simulator.conversation import Conversation, Item
from relay.simulator.generated import (
    ANSWER_WORDS_PER_S,
    CANNED_ANSWER_SENTENCES,
    OUTPUT_AUDIO_MS_PER_TOKEN,
    PROMPT_CACHE_BLOCK_TOKENS,
    RATE_LIMIT_TOKENS_PER_MIN,
    AudioChunks,
    answer_audio_chunks,
    canned_words,
    fit_output_budget,
    text_tokens,
)
from relay.simulator.outbox import (
    MARK_AUDIO,
    MARK_FINISHED,
    MARK_NONE,
    MARK_WORD,
    Marker,
    Outbox,
)

JSON = dict[str, Any]


@dataclass(slots=True)
class ResponseRun:
    """A response being streamed: its plan and how much of it has fallen due."""

    response_id: str
    item_id: str
    conversation_id: str | None
    previous_item_id: str | None
    modality: Literal["audio", "text"]
    output_format: JSON
    voice: Any
    max_output_tokens: Any
    metadata: Any
    words: list[str]
    audio_chunks: AudioChunks
    input_text_tokens: int
    input_audio_tokens: int
    cached_tokens: int
    item: Item
    words_due: int = 0
    chunks_due: int = 0
    audio_bytes_due: int = 0
    #: The status the plan ends with if not cancelled ("completed" or "incomplete").
    final_status: str = "completed"
    final_reason: str | None = None

    def note(self, kind: int, amount: int) -> None:
        if kind == MARK_AUDIO:
            self.chunks_due += 1
            self.audio_bytes_due += amount
        elif kind == MARK_WORD:
            self.words_due += 1


class Responses:
    """The responses of one session: at most one active, each streamed through the outbox."""

    def __init__(
        self,
        config: SimulatorConfig,
        outbox: Outbox,
        conversation: Conversation,
        *,
        conversation_id: str,
        audio_seed: int,
        id_factory: IdFactory,
    ) -> None:
        self.config = config
        self._outbox = outbox
        self._conversation = conversation
        self._conversation_id = conversation_id
        self._audio_seed = audio_seed
        self._new_id = id_factory
        #: The response being streamed, if any (one at a time, as OpenAI's).
        self.active: ResponseRun | None = None
        #: Whether any response spoke: the voice can no longer change.
        self.assistant_audio_started = False
        self._previous_prompt_tokens = 0
        self._answers_given = 0

    def on_due(self, marker: Marker) -> None:
        """One of a response's events fell due (was sent, from the session's view)."""
        run = marker.run
        if run is None:
            return
        if marker.kind == MARK_FINISHED:
            self._finish_run(run, run.words_due, run.chunks_due, run.final_status)
        else:
            run.note(marker.kind, marker.amount)

    def on_create(self, event: JSON, session: JSON) -> None:
        """``response.create``."""
        params = event.get("response")
        if params is not None:
            RESPONSE_PARAMS(params, "response")
        if session["type"] != "realtime":
            # [unconfirmed wording]
            raise ClientEventError(
                "Responses cannot be created in a transcription session.",
                code="invalid_value",
                param="type",
            )
        if self.active is not None:
            raise ClientEventError(
                "Conversation already has an active response in progress: "
                f"{self.active.response_id}. Wait until the response is finished before "
                "creating a new one.",
                code="conversation_already_has_active_response",
            )
        self.start(session, params)

    def on_cancel(self, event: JSON) -> None:
        """``response.cancel``."""
        response_id = event.get("response_id")
        if response_id is not None:
            v.string()(response_id, "response_id")
        run = self.active
        if run is None or (response_id and response_id != run.response_id):
            raise ClientEventError(
                "Cancellation failed: no active response found", code="response_cancel_not_active"
            )
        self.cancel(run, reason="client_cancelled")

    def start(self, session: JSON, params: JSON | None) -> None:
        """Plan a response and schedule every event of it (paced or all at once)."""
        params = params or {}
        modality: Literal["audio", "text"] = (
            "text"
            if (params.get("output_modalities") or session["output_modalities"]) == ["text"]
            else "audio"
        )
        output_audio = params.get("audio", {}).get("output", {})
        output_format = (
            normalized_format(output_audio["format"])
            if "format" in output_audio
            else copy.deepcopy(session["audio"]["output"]["format"])
        )
        voice = output_audio.get("voice", session["audio"]["output"]["voice"])
        max_tokens: int | str = session["max_output_tokens"]
        if "max_output_tokens" in params:
            max_tokens = params["max_output_tokens"]
        instructions = str(params.get("instructions", session["instructions"]))
        tools = params.get("tools", session["tools"])
        conversation = params.get("conversation") or "auto"
        in_conversation = conversation != "none"

        # Usage of the context this response reads.
        context = self._conversation.context_items(
            params, session["audio"]["input"]["format"]["type"]
        )
        context_text = text_tokens(instructions) + (
            text_tokens(orjson.dumps(tools).decode()) if tools else 0
        )
        context_audio = 0
        for item in context:
            item_text, item_audio = item.context_tokens()
            context_text += item_text
            context_audio += item_audio
        prompt_tokens = context_text + context_audio
        cacheable = min(prompt_tokens, max(self._previous_prompt_tokens, text_tokens(instructions)))
        cached = cacheable // PROMPT_CACHE_BLOCK_TOKENS * PROMPT_CACHE_BLOCK_TOKENS
        if in_conversation:
            self._previous_prompt_tokens = prompt_tokens

        # The answer: words paced like speech over the configured audio length.
        total_ms = self.config.response_audio_ms
        word_count = max(1, round(total_ms / 1000 * ANSWER_WORDS_PER_S))
        words = canned_words(CANNED_ANSWER_SENTENCES, word_count, self._answers_given)
        self._answers_given += 1
        chunks: AudioChunks = ()
        if modality == "audio":
            chunks = answer_audio_chunks(
                total_ms, self.config.delta_audio_ms, self._audio_seed, output_format["type"]
            )
        final_status, final_reason = "completed", None
        if max_tokens != "inf":
            words, chunks, truncated = fit_output_budget(
                words, chunks, int(max_tokens), audio.bytes_per_ms(output_format["type"])
            )
            if truncated:
                final_status, final_reason = "incomplete", "max_output_tokens"

        response_id = self._new_id("resp_")
        item_id = self._new_id("item_")
        previous = self._conversation.last_item_id() if in_conversation else None
        item_wire: JSON = {
            "id": item_id,
            "type": "message",
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        item = Item(item_id, "assistant", item_wire, audio_format=output_format["type"])
        run = ResponseRun(
            response_id=response_id,
            item_id=item_id,
            conversation_id=self._conversation_id if in_conversation else None,
            previous_item_id=previous,
            modality=modality,
            output_format=output_format,
            voice=voice,
            max_output_tokens=max_tokens,
            metadata=params.get("metadata"),
            words=words,
            audio_chunks=chunks,
            input_text_tokens=context_text,
            input_audio_tokens=context_audio,
            cached_tokens=cached,
            item=item,
            final_status=final_status,
            final_reason=final_reason,
        )
        self.active = run
        if in_conversation:
            self._conversation.append(item)
        if modality == "audio":
            self.assistant_audio_started = True
        self._schedule_run(run)

    def _schedule_run(self, run: ResponseRun) -> None:
        """Every event of a response, in OpenAI's order; deltas paced if configured."""
        start = self._outbox.now
        plain = Marker(run, MARK_NONE, 0)

        def at(due: float, event_type: str, fields: JSON, marker: Marker = plain) -> None:
            self._outbox.schedule(due, self._outbox.event(event_type, fields), marker)

        opened = dict(run.item.wire, content=[])
        at(
            start,
            "response.created",
            {"response": self._response_object(run, "in_progress", None, [], None)},
        )
        at(
            start,
            "response.output_item.added",
            {"response_id": run.response_id, "output_index": 0, "item": opened},
        )
        if run.conversation_id is not None:
            at(
                start,
                "conversation.item.added",
                {"previous_item_id": run.previous_item_id, "item": opened},
            )
        ids = self._part_ids(run)
        # The part type stays "audio"/"text" on the wire (GA items say output_audio/output_text).
        part: JSON = (
            {"type": "audio", "transcript": ""}
            if run.modality == "audio"
            else {"type": "text", "text": ""}
        )
        at(start, "response.content_part.added", {**ids, "part": part})
        words, chunks = run.words, run.audio_chunks
        word_delta = (
            "response.output_audio_transcript.delta"
            if run.modality == "audio"
            else "response.output_text.delta"
        )

        def word_event(due: float, word: str) -> None:
            fields = {**ids, "delta": word, "obfuscation": self._outbox.ids.obfuscation(word)}
            at(due, word_delta, fields, Marker(run, MARK_WORD, 0))

        end = start
        if chunks:
            step_s = self.config.delta_audio_ms / 1000 if self.config.realtime_pacing else 0.0
            for index, (raw, b64) in enumerate(chunks):
                due = start + index * step_s
                # Words spread over the chunks; a chunk's words precede its audio, as
                # OpenAI's transcript runs slightly ahead of the audio.
                first = -(-index * len(words) // len(chunks))  # ceiling division
                last = -(-(index + 1) * len(words) // len(chunks))
                for word in words[first:last]:
                    word_event(due, word)
                at(
                    due,
                    "response.output_audio.delta",
                    {**ids, "delta": b64},
                    Marker(run, MARK_AUDIO, len(raw)),
                )
            end = start + (len(chunks) - 1) * step_s
        else:
            for word in words:
                word_event(start, word)
        for payload, finishes in self._tail_events(
            run, len(words), len(chunks), run.final_status, run.final_reason
        ):
            self._outbox.schedule(
                end, payload, Marker(run, MARK_FINISHED, 0) if finishes else plain
            )

    def _part_ids(self, run: ResponseRun) -> JSON:
        return {
            "response_id": run.response_id,
            "item_id": run.item_id,
            "output_index": 0,
            "content_index": 0,
        }

    def _response_object(
        self,
        run: ResponseRun,
        status: str,
        status_details: JSON | None,
        output: list[JSON],
        usage: JSON | None,
    ) -> JSON:
        return {
            "object": "realtime.response",
            "id": run.response_id,
            "status": status,
            "status_details": status_details,
            "output": output,
            "conversation_id": run.conversation_id,
            "output_modalities": [run.modality],
            "max_output_tokens": run.max_output_tokens,
            "audio": {"output": {"format": run.output_format, "voice": run.voice}},
            "usage": usage,
            "metadata": run.metadata,
        }

    def _final_content(self, run: ResponseRun, words_sent: int) -> tuple[JSON, JSON]:
        """(item content, content part) for what the client received."""
        text = "".join(run.words[:words_sent])
        if run.modality == "audio":
            return {"type": "output_audio", "transcript": text}, {
                "type": "audio",
                "transcript": text,
            }
        return {"type": "output_text", "text": text}, {"type": "text", "text": text}

    def _usage(self, run: ResponseRun, words_sent: int, chunks_sent: int) -> JSON:
        """A usage object whose totals add up: total = input + output, details sum."""
        audio_ms = self._sent_audio_ms(run, chunks_sent)
        output_audio_tokens = math.ceil(audio_ms / OUTPUT_AUDIO_MS_PER_TOKEN)
        output_text_tokens = text_tokens("".join(run.words[:words_sent]))
        input_tokens = run.input_text_tokens + run.input_audio_tokens
        output_tokens = output_text_tokens + output_audio_tokens
        # Cached tokens are a prefix of the input: text first (instructions), then audio.
        cached_text = min(run.cached_tokens, run.input_text_tokens)
        cached_audio = min(run.cached_tokens - cached_text, run.input_audio_tokens)
        return {
            "total_tokens": input_tokens + output_tokens,
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "input_token_details": {
                "text_tokens": run.input_text_tokens,
                "audio_tokens": run.input_audio_tokens,
                "image_tokens": 0,
                "cached_tokens": cached_text + cached_audio,
                "cached_tokens_details": {
                    "text_tokens": cached_text,
                    "audio_tokens": cached_audio,
                    "image_tokens": 0,
                },
            },
            "output_token_details": {
                "text_tokens": output_text_tokens,
                "audio_tokens": output_audio_tokens,
            },
        }

    @staticmethod
    def _sent_audio_ms(run: ResponseRun, chunks_sent: int) -> float:
        sent = sum(len(raw) for raw, _ in run.audio_chunks[:chunks_sent])
        return sent / audio.bytes_per_ms(run.output_format["type"])

    def _tail_events(
        self,
        run: ResponseRun,
        words_sent: int,
        chunks_sent: int,
        status: str,
        reason: str | None,
    ) -> list[tuple[bytes, bool]]:
        """The closing events of a response as ``(payload, ends_the_response)``."""
        ids = self._part_ids(run)
        content, part = self._final_content(run, words_sent)
        item_wire: JSON = {
            "id": run.item_id,
            "type": "message",
            "status": "completed" if status == "completed" else "incomplete",
            "role": "assistant",
            "content": [content],
        }
        events: list[tuple[bytes, bool]] = []

        def add(event_type: str, fields: JSON, *, finishes: bool = False) -> None:
            events.append((self._outbox.event(event_type, fields), finishes))

        if run.modality == "audio":
            add("response.output_audio.done", ids)
            add(
                "response.output_audio_transcript.done",
                {**ids, "transcript": content["transcript"]},
            )
        else:
            add("response.output_text.done", {**ids, "text": content["text"]})
        add("response.content_part.done", {**ids, "part": part})
        add(
            "response.output_item.done",
            {"response_id": run.response_id, "output_index": 0, "item": item_wire},
        )
        if run.conversation_id is not None:
            add(
                "conversation.item.done",
                {"previous_item_id": run.previous_item_id, "item": item_wire},
            )
        usage = self._usage(run, words_sent, chunks_sent)
        details = None if status == "completed" else {"type": status, "reason": reason}
        add(
            "response.done",
            {"response": self._response_object(run, status, details, [item_wire], usage)},
            finishes=True,
        )
        # OpenAI follows every response.done with the token budget left.
        total = usage["total_tokens"]
        add(
            "rate_limits.updated",
            {
                "rate_limits": [
                    {
                        "name": "tokens",
                        "limit": RATE_LIMIT_TOKENS_PER_MIN,
                        "remaining": RATE_LIMIT_TOKENS_PER_MIN - total,
                        "reset_seconds": round(60 * total / RATE_LIMIT_TOKENS_PER_MIN, 3),
                    }
                ]
            },
        )
        return events

    def _finish_run(self, run: ResponseRun, words_sent: int, chunks_sent: int, status: str) -> None:
        """The response is over: the conversation keeps what the client received."""
        if self.active is run:
            self.active = None
        content, _ = self._final_content(run, words_sent)
        run.item.wire.update(
            status="completed" if status == "completed" else "incomplete", content=[content]
        )
        run.item.audio_ms = self._sent_audio_ms(run, chunks_sent)
        if chunks_sent and run.conversation_id is not None:
            kept = b"".join(raw for raw, _ in run.audio_chunks[:chunks_sent])
            if self._conversation.retain(kept):
                run.item.audio_bytes = kept

    def cancel(self, run: ResponseRun, *, reason: str) -> None:
        """Unschedule what is not yet due and close the response as cancelled."""
        self._outbox.unschedule(run)
        for payload, _ in self._tail_events(
            run, run.words_due, run.chunks_due, "cancelled", reason
        ):
            self._outbox.ready.append(payload)
        self._finish_run(run, run.words_due, run.chunks_due, "cancelled")


__all__ = ["ResponseRun", "Responses"]
