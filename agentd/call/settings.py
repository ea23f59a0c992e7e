"""What a call needs to know from the configuration: pure values, no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DEFAULT_GREETING = "Hello, thank you for calling. How can I help you today?"
DEFAULT_FALLBACK = "Sorry, I didn't catch that. Could you say it again?"
CutMethod = Literal["flush", "restart"]
BargeIn = Literal["speech", "transcript", "off"]


@dataclass(frozen=True, slots=True)
class CallSettings:
    """What a call needs to know from the configuration (pure values, no I/O).

    These defaults are the only ones: agentd.config takes every per-call default from here."""

    greeting: str = DEFAULT_GREETING
    language: str = "en-US"
    tts_provider: str = "elevenlabs"
    voice_id: str = "21m00Tcm4TlvDq8ikWAM"
    stt_provider: str = "aws"
    system_prompt: str = "You are a helpful voice agent on a phone call. Answer briefly."
    barge_in: BargeIn = "speech"
    barge_in_min_words: int = 2
    barge_in_min_chars: int = 4
    echo_guard_s: float = 1.0
    cut_method: CutMethod | None = None  # None: flush for gcp, stop + new session otherwise
    chars_per_s: float = 15.0
    playback_pad_s: float = 1.0
    history_limit: int = 40
    fallback_text: str = DEFAULT_FALLBACK
    speaking_poll_s: float = 0.2
    speaking_poll_max_s: float = 2.0
    speaking_activate_timeout_s: float = 15.0
    retry_s: float = 1.0
    max_attempts: int = 4
    silence_s: float = 20.0  # 0 turns the reprompt off
    max_silence_reprompts: int = 2
    reprompt_text: str = "Are you still there?"
    silence_goodbye: str = "I haven't heard from you, so I'll end the call now. Goodbye!"
    max_call_s: float = 3300.0  # VoIPBIN itself cuts every call at one hour
    time_limit_goodbye: str = "We have reached the time limit for this call. Goodbye!"
    watch_s: float = 20.0  # ask VoIPBIN about a call we have heard nothing of for this long
    watch_max_s: float = 120.0
    transcript_due_s: float = 3.0  # speech ended but no transcript yet: it may have been lost

    @property
    def cut(self) -> CutMethod:
        """How a barge-in cuts the audio for this provider (docs/protocol.md §8.2)."""
        if self.cut_method is not None:
            return self.cut_method
        return "flush" if self.tts_provider == "gcp" else "restart"
