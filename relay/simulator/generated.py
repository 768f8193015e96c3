"""What the simulated model says, and how many tokens it counts for.

This module owns the deterministic content the simulator generates in place of a
model, and the arithmetic of its usage numbers:

- the spoken answer: a speech-like signal in the output format, cut into delta
  chunks, computed once per shape and seed (:func:`answer_audio_chunks`);
- the words: canned answer and user sentences, as deltas with their leading space
  (:func:`canned_words`), spoken at :data:`ANSWER_WORDS_PER_S`;
- token counts: text by characters, audio by duration, per-item framing, prompt
  caching in blocks of 64, the rate limit ``rate_limits.updated`` reports, and the
  cut of a planned answer to ``max_output_tokens`` (:func:`fit_output_budget`).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Final

from relay.protocol import audio

#: Speaking rate of the generated answer: its transcript has this many words per second.
ANSWER_WORDS_PER_S: Final = 2.5
#: Rough text tokenisation used for usage numbers.
CHARS_PER_TEXT_TOKEN: Final = 4
#: Realtime audio tokens: user audio is about 10 tokens/s, assistant audio about 20/s.
INPUT_AUDIO_MS_PER_TOKEN: Final = 100
OUTPUT_AUDIO_MS_PER_TOKEN: Final = 50
#: Per-item framing tokens in the model context.
ITEM_OVERHEAD_TOKENS: Final = 4
#: Prompt caching works in blocks of this many tokens (cached counts are multiples of 64).
PROMPT_CACHE_BLOCK_TOKENS: Final = 64
#: What ``rate_limits.updated`` reports as the per-minute token limit (seen live).
RATE_LIMIT_TOKENS_PER_MIN: Final = 15_000_000

#: Seed of the spoken answer when a session is given none (one cached signal for all).
DEFAULT_AUDIO_SEED: Final = 0
CANNED_ANSWER_SENTENCES: Final = (
    "Loud and clear!",
    "I can hear you perfectly.",
    "Sure, I'd be happy to help with that.",
    "Here is a quick summary of what we discussed.",
    "That sounds like a great plan to me.",
    "Let me think about that for a second.",
    "The weather today looks sunny with a light breeze.",
    "Thanks for asking, I'm doing well.",
)
CANNED_USER_SENTENCES: Final = (
    "Hello there.",
    "Can you hear me?",
    "What's the weather like today?",
    "Tell me something interesting.",
    "Thanks, that's all for now.",
)

#: A spoken answer: ``(raw, base64)`` per ``response.output_audio.delta``.
AudioChunks = tuple[tuple[bytes, str], ...]


@lru_cache(maxsize=16)
def answer_audio_chunks(total_ms: int, chunk_ms: int, seed: int, format_type: str) -> AudioChunks:
    """The spoken answer as ``(raw, base64)`` chunks; computed once per shape and seed."""
    rate = audio.bytes_per_ms(format_type)
    signal = audio.speech_like_in_format(total_ms, seed, format_type)
    return tuple(
        (chunk, audio.b64encode(chunk)) for chunk in audio.split_chunks(signal, chunk_ms, rate)
    )


def canned_words(sentences: tuple[str, ...], word_count: int, start: int) -> list[str]:
    """``word_count`` words from the canned sentences, ending in punctuation."""
    words: list[str] = []
    index = start
    while len(words) < word_count:
        words.extend(sentences[index % len(sentences)].split())
        index += 1
    words = words[:word_count]
    if words[-1][-1] not in ".!?":
        words[-1] += "."
    # Deltas carry their leading space, as OpenAI's do (" there", " friend").
    return [words[0]] + [" " + word for word in words[1:]]


def text_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TEXT_TOKEN)


def fit_output_budget(
    words: list[str], chunks: AudioChunks, budget: int, rate: int
) -> tuple[list[str], AudioChunks, bool]:
    """Cut the planned answer to ``max_output_tokens``; ``True`` if it was cut."""
    planned_text_tokens = text_tokens("".join(words))
    audio_ms = sum(len(raw) for raw, _ in chunks) / rate
    if planned_text_tokens + math.ceil(audio_ms / OUTPUT_AUDIO_MS_PER_TOKEN) <= budget:
        return words, chunks, False
    if not chunks:
        kept: list[str] = []
        for word in words:
            if text_tokens("".join([*kept, word])) > budget:
                break
            kept.append(word)
        return kept, chunks, True
    kept_chunks: list[tuple[bytes, str]] = []
    for chunk in chunks:
        count = len(kept_chunks) + 1
        kept_words = words[: -(-count * len(words) // len(chunks))]
        ms = sum(len(raw) for raw, _ in [*kept_chunks, chunk]) / rate
        if text_tokens("".join(kept_words)) + math.ceil(ms / OUTPUT_AUDIO_MS_PER_TOKEN) > budget:
            break
        kept_chunks.append(chunk)
    kept_words = words[: -(-len(kept_chunks) * len(words) // len(chunks))]
    return kept_words, tuple(kept_chunks), True


__all__ = [
    "ANSWER_WORDS_PER_S",
    "CANNED_ANSWER_SENTENCES",
    "CANNED_USER_SENTENCES",
    "DEFAULT_AUDIO_SEED",
    "INPUT_AUDIO_MS_PER_TOKEN",
    "ITEM_OVERHEAD_TOKENS",
    "OUTPUT_AUDIO_MS_PER_TOKEN",
    "PROMPT_CACHE_BLOCK_TOKENS",
    "RATE_LIMIT_TOKENS_PER_MIN",
    "AudioChunks",
    "answer_audio_chunks",
    "canned_words",
    "fit_output_budget",
    "text_tokens",
]
