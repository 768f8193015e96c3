"""The audio a simulated session received, kept for tests (off unless asked for).

This module owns the simulator's record of input audio, so an end-to-end test
(a browser's fake microphone, a load tool, an SDK) can check that the audio it
sent arrived as sent, whichever path carried it: ``input_audio_buffer.append``
text events or ``relay.audio.v1`` binary messages (which the simulator turns into
appends before its engine sees them, as the relay does).

A :class:`ReceivedAudio` is one session's record: the decoded audio of every
accepted append, in order, up to :data:`RECEIVED_AUDIO_MAX_BYTES` (the first
minute of 24 kHz PCM16; later audio is counted, not kept), in the input format
the session had at that append. :class:`~relay.simulator.server.Simulator` keeps
one per session, newest last, in ``Simulator.received_audio`` when it was built
with ``record_audio=True``, at most :data:`RECEIVED_AUDIO_MAX_SESSIONS` (the
oldest record goes first).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Final

from relay.protocol import audio

#: Audio kept per session: one minute of 24 kHz PCM16 (48,000 bytes a second).
RECEIVED_AUDIO_MAX_BYTES: Final = 60 * 1000 * audio.PCM16_BYTES_PER_MS
#: Sessions whose record the simulator keeps; beyond, the oldest record is dropped.
RECEIVED_AUDIO_MAX_SESSIONS: Final = 64


@dataclass(slots=True)
class ReceivedAudio:
    """One session's received input audio: the first :data:`RECEIVED_AUDIO_MAX_BYTES`."""

    #: Whether the session selected ``relay.audio.v1`` (binary audio messages).
    binary_path: bool = False
    #: The audio kept, in arrival order, in the session's input format.
    pcm: bytearray = field(default_factory=bytearray)
    #: Every byte of audio received, kept or not.
    total_bytes: int = 0
    #: Accepted appends (text or binary) that carried the audio.
    appends: int = 0
    #: The input format of the latest append (``audio/pcm``, ``audio/pcmu``, ``audio/pcma``).
    input_format: str = "audio/pcm"

    def add(self, chunk: bytes, input_format: str) -> None:
        """Record one append's decoded audio (the engine's ``on_audio`` observer)."""
        self.appends += 1
        self.total_bytes += len(chunk)
        self.input_format = input_format
        room = RECEIVED_AUDIO_MAX_BYTES - len(self.pcm)
        if room > 0:
            self.pcm += chunk[:room]

    @property
    def truncated(self) -> bool:
        """Whether more audio arrived than the record keeps."""
        return self.total_bytes > len(self.pcm)

    def rms(self) -> float:
        """RMS of the kept audio, normalised to full scale (0.0 .. 1.0)."""
        return audio.rms_in_format(self.pcm, self.input_format)

    def dbfs(self) -> float:
        """The kept audio's level in dBFS (-120 for silence)."""
        return audio.dbfs(self.rms())

    def sha256(self) -> str:
        """Hex SHA-256 of the kept audio, to compare with what a test sent."""
        return hashlib.sha256(self.pcm).hexdigest()


__all__ = [
    "RECEIVED_AUDIO_MAX_BYTES",
    "RECEIVED_AUDIO_MAX_SESSIONS",
    "ReceivedAudio",
]
