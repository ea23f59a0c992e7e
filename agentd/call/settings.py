"""What a call needs to know from the configuration: pure values, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

DEFAULT_GREETING = "Hello, thank you for calling. How can I help you today?"
DEFAULT_FALLBACK = "Sorry, I didn't catch that. Could you say it again?"
_CJK = frozenset({"ko", "ja", "zh"})
_CJK_RATIO = 6.0 / 15.0  # CJK characters a second to Latin ones (VoIPBIN's client, measured)
# Hangul Jamo, CJK punctuation and kana, compatibility Jamo, the ideographs, Hangul syllables,
# compatibility ideographs, full-width forms
_CJK_BLOCKS = (
    *((0x1100, 0x11FF), (0x3000, 0x30FF), (0x3130, 0x318F), (0x3400, 0x4DBF)),
    *((0x4E00, 0x9FFF), (0xAC00, 0xD7AF), (0xF900, 0xFAFF), (0xFF00, 0xFFEF)),
)


def mostly_cjk(text: str) -> bool:
    """Whether at least half the letters of `text` are Korean, Japanese or Chinese: it is
    read at their pace (a brand name in a Korean sentence does not change it)."""
    if text.isascii():
        return False  # the usual case, at once
    letters = [ord(ch) for ch in text if ch.isalnum()]
    cjk = sum(1 for c in letters if any(lo <= c <= hi for lo, hi in _CJK_BLOCKS))
    return bool(letters) and 2 * cjk >= len(letters)


# what is said, by language, when the reply is slow to come, and before cutting a long turn short
FILLERS = {"en": "One moment.", "ko": "잠시만요.", "ja": "少々お待ちください。", "zh": "请稍等。"}
# said when the backend ends the call without a word of its own (a model's end_call alone)
GOODBYES = {"en": "Goodbye!", "ko": "안녕히 계세요.", "ja": "失礼いたします。", "zh": "再见。"}
CUT_INS = {
    "en": "Sorry to cut in.",
    "ko": "말씀 중에 죄송합니다.",
    "ja": "お話し中すみません。",
    "zh": "抱歉打断一下。",
}
CutMethod = Literal["flush", "restart"]
BargeIn = Literal["speech", "transcript", "off"]
ReplyOn = Literal["final", "interim"]


# agent.turn_marker: the backend's own verdict on the end of the caller's turn (cf. Pipecat's
# LLM turn completion). The reply's first character is read, and never spoken.
TURN_MARKER_PROMPT = (
    "Before every reply, judge whether the caller has finished what they wanted to say. "
    "Start your reply with exactly one of these characters: "
    "✓ if they have finished (then reply as usual after it); "
    "○ if they stopped mid-sentence and will go on in a moment; "
    "◐ if they are thinking and will need longer. "
    "After ○ or ◐ write nothing else."
)
# said to the backend when a caller it judged unfinished has stayed quiet
TURN_NUDGE = "The caller has stopped talking. Reply now, starting with ✓."


@dataclass(frozen=True, slots=True)
class CallSettings:
    """What a call needs to know from the configuration (pure values, no I/O).

    These defaults are the only ones: agentd.config takes every per-call default from here."""

    greeting: str = DEFAULT_GREETING
    outbound_greeting: str = ""  # the greeting of calls agentd placed ("": `greeting`)
    language: str = "en-US"
    tts_provider: str = "elevenlabs"
    voice_id: str = ""  # "": VoIPBIN's default voice of tts_provider for the language
    stt_provider: str = "aws"
    system_prompt: str = "You are a helpful voice agent on a phone call. Answer briefly."
    barge_in: BargeIn = "speech"
    barge_in_min_words: int = 2
    barge_in_min_chars: int = 4
    barge_in_greeting: bool = True  # False: the greeting (a disclosure, say) is never cut
    # words (lower case) that, alone, never cut the agent nor take the turn while it talks,
    # on top of the built-in English, Korean, Japanese and Chinese ones (agentd.call.talk)
    backchannels: tuple[str, ...] = ()
    echo_guard_s: float = 1.0
    # a reply's first audio waits this long after the caller's final: one sentence often
    # arrives as several finals ~0.5 s apart. Interims after it mean the caller goes on: the
    # reply then waits for their final, which comes ~1.1 s after the words (up to final_wait_s)
    final_hold_s: float = 0.5
    final_wait_s: float = 1.6
    # "interim": the end of the caller's turn is read from their interims (stable text, cues of
    # the language, their own pauses) and the reply is asked for before the final transcript;
    # "final": only on final transcripts (agentd.call.endpoint)
    reply_on: ReplyOn = "interim"
    # interim: the turn is over after this long without new words when they end a sentence
    # (0.6 of it after a question, 1.5 times it when nothing tells, longer for a caller who
    # pauses mid-thought); the backend is asked at once on a question or a full sentence, after
    # `speculate_s` of stable words otherwise, at most `max_speculative` times a turn
    end_of_turn_s: float = 0.6
    # with a TTS only a /stop cuts (ElevenLabs), a statement's end waits at least this long: a
    # reply sent too early is retracted by a /stop (~0.5 s) that must land before its audio
    # starts, and the next sentence's interims only come with this one's final (~1.1 s)
    end_of_turn_stop_s: float = 0.9
    speculate_s: float = 0.35
    max_speculative: int = 3
    # a short line when the reply's first sentence is not ready this long after the end of the
    # caller's turn: its audio fills the ~1 s VoIPBIN takes to start the reply's. 0: never;
    # "" text: by the language (FILLERS)
    filler_after_s: float = 1.0
    filler_text: str = ""
    # reply_on = interim: a caller's turn longer than this is cut short politely and answered
    # (the cut-in line, "" by the language: CUT_INS); 0: no limit
    max_turn_s: float = 60.0
    cut_in_text: str = ""
    barge_in_actions: bool = False  # False: a goodbye or "transferring you" plays to its end
    # the backend judges the end of the turn too (TURN_MARKER_PROMPT is added to the system
    # prompt): a reply it starts with ○ (◐) is dropped, and the caller given 5 s (10 s) more
    turn_marker: bool = False
    cut_method: CutMethod | None = None  # None: flush for gcp and aws, else stop + new session
    chars_per_s: float = 0.0  # playback estimate; 0: by the language's script (`rate`)
    say_latency_s: float = 1.1  # /say → first audio, measured 0.9-1.3 s (docs/protocol.md §11)
    # aws: the most audio sent ahead of playback. Its pod buffers 16.4 s (aws.go: 64 chunks
    # of 0.256 s) and a /say that does not fit waits inside the request, answered 503 after
    # the gateway's 3 s; the margin covers a voice slower than `rate` and a late /say
    aws_ahead_s: float = 12.0
    playback_pad_s: float = 1.0
    history_limit: int = 40
    fallback_text: str = DEFAULT_FALLBACK
    speaking_poll_s: float = 0.2
    speaking_poll_max_s: float = 2.0
    speaking_activate_timeout_s: float = 15.0
    # the greeting waits this long for the transcribe to be up (a slow or rate-limited create):
    # what the caller answers to it before then is heard by nobody. Usually the transcribe is
    # up first (the speaking is polled until active) and the greeting does not wait at all
    greet_wait_s: float = 3.0
    retry_s: float = 1.0
    max_attempts: int = 4
    # a speaking create that fails for want of an answer (none, a 429, a 5xx: a gateway blip, a
    # rolling restart) is no refusal: it is retried ever less often, `retry_s` doubling up to
    # `speaking_retry_max_s`, for `speaking_outage_s` before the call is ended (a caller who
    # never hears the agent is better hung up on than left in silence). A refusal (another
    # 4xx, a voice the provider refuses) is given up after `max_attempts` failures in a row
    speaking_outage_s: float = 20.0
    speaking_retry_max_s: float = 2.0
    # a transcribe create that fails so is retried as long as the call lives, `retry_s` doubling
    # up to this: the agent still talks, and the caller is heard again once VoIPBIN answers
    transcribe_retry_max_s: float = 30.0
    # a stop that keeps failing: DELETE after this many tries (a dead tts pod answers every
    # /stop 503, docs/protocol.md §8.3); refused (a 4xx) `max_stop_attempts` times: give up,
    # loudly. An outage (no answer, 429, 5xx) is waited out instead
    stop_delete_after: int = 2
    max_stop_attempts: int = 8
    # at a hangup VoIPBIN ends the call's transcribe itself (`transcribe_done`), so no /stop is
    # sent for it; one is, only if that `done` has not come this long after the call ended.
    # VoIPBIN's own stop waits for at most one 3 s internal request per STT stream
    # (bin-common-handler `requestTimeoutDefault`, bin-transcribe-manager `stopLive`)
    transcribe_end_wait_s: float = 5.0
    # speaking sessions replaced because every /say on them failed, before the call is ended
    # (a voice the provider refuses makes VoIPBIN answer 404 to every /say, §8.1)
    max_speaking_restarts: int = 3
    say_5xx_limit: int = 2  # /say 5xx in a row on one session: its pod is gone, replace it
    silence_s: float = 20.0  # 0 turns the reprompt off
    max_silence_reprompts: int = 2
    reprompt_text: str = "Are you still there?"
    silence_goodbye: str = "I haven't heard from you, so I'll end the call now. Goodbye!"
    max_call_s: float = 3300.0  # VoIPBIN itself cuts every call at one hour
    time_limit_goodbye: str = "We have reached the time limit for this call. Goodbye!"
    # numbers the agent may hand a caller over to; empty: no transfers (the tool is not offered)
    transfer_numbers: tuple[str, ...] = ()
    transfer_failed_text: str = "Sorry, I can't transfer you right now."
    watch_s: float = 20.0  # ask VoIPBIN about a call we have heard nothing of for this long
    watch_max_s: float = 120.0
    transcript_due_s: float = 3.0  # speech ended but no transcript yet: it may have been lost

    @property
    def rate(self) -> float:
        """Playback speed in characters/s: measured ≈15 for Latin scripts, ≈6 for Korean,
        Japanese and Chinese (VoIPBIN's own client, docs/protocol.md §11)."""
        if self.chars_per_s > 0:
            return self.chars_per_s
        return 6.0 if self.language.lower()[:2] in _CJK else 15.0

    def rate_for(self, text: str) -> float:
        """Playback speed for `text`: its script's, not the language's (a Korean goodbye from
        an English agent plays at the Korean pace). `rate` is the language's script's; the
        other script's follows the measured ratio, 6 to 15."""
        language_cjk = self.language.lower()[:2] in _CJK
        if mostly_cjk(text) == language_cjk:
            return self.rate
        return self.rate * _CJK_RATIO if not language_cjk else self.rate / _CJK_RATIO

    def scaled(self, factor: float) -> CallSettings:
        """These settings for a platform `factor` times as slow (a simulator shrunk for tests,
        benchmarks or `agentd console --fast`): the machine-paced waits scaled, the voice
        expected `1 / factor` times as fast. The human-paced ones (silence, turn and call
        limits) are not: the caller is no quicker."""
        waits = {name: getattr(self, name) * factor for name in MACHINE_PACED}
        return replace(self, **waits, chars_per_s=self.rate / factor)

    @property
    def prompt(self) -> str:
        """The system prompt the backend sees."""
        if not self.turn_marker:
            return self.system_prompt
        return f"{self.system_prompt}\n\n{TURN_MARKER_PROMPT}".strip()

    @property
    def filler(self) -> str:
        """The filler line for the language."""
        return self.filler_text or FILLERS.get(self.language.lower()[:2], FILLERS["en"])

    @property
    def goodbye(self) -> str:
        """The goodbye for the language, when the backend gave none."""
        return GOODBYES.get(self.language.lower()[:2], GOODBYES["en"])

    @property
    def cut_in(self) -> str:
        """The line said before cutting a long turn short."""
        return self.cut_in_text or CUT_INS.get(self.language.lower()[:2], CUT_INS["en"])

    @property
    def cut(self) -> CutMethod:
        """How a barge-in cuts the audio for this provider (docs/protocol.md §8.2): a flush
        cuts with `gcp` (the stream is closed) and `aws` (the pod's buffered audio is dropped,
        so the say stops within its 0.26 s chunk); with ElevenLabs only a stop does."""
        if self.cut_method is not None:
            return self.cut_method
        return "flush" if self.tts_provider in ("gcp", "aws") else "restart"


#: The waits `CallSettings.scaled` scales: they follow the platform's latencies, not the caller.
MACHINE_PACED = (
    "final_hold_s",
    "final_wait_s",
    "say_latency_s",
    "end_of_turn_s",
    "end_of_turn_stop_s",
    "speculate_s",
    "echo_guard_s",
    "filler_after_s",
    "playback_pad_s",
    "transcribe_end_wait_s",
)
