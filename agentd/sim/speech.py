"""Audio on a call: TTS playback of ``/say`` text and STT output (speech events, transcripts).

Playback is real time: a say takes ``len(text) / playback_chars_per_s`` seconds and says play
back to back. What was heard is recorded in the call's conversation, truncated where the audio
was cut (``/stop``, a ``gcp`` flush, or the hangup). Flush follows the provider (docs/protocol.md
§8.2): ``gcp`` cuts and drops the queue, ``aws`` drops only what has not started,
``elevenlabs`` changes nothing.
"""

from __future__ import annotations

import asyncio
import time
from typing import Literal

from agentd.sim.clock import go_time
from agentd.sim.model import (
    JSON,
    Line,
    SayItem,
    SimCall,
    SimSpeaking,
    SimTranscribe,
    SimTranscript,
    new_id,
)
from agentd.sim.state import World


class Speech:
    """TTS and STT behaviour on top of the shared :class:`World`."""

    def __init__(self, world: World) -> None:
        self.world = world

    # == STT ======================================================================================

    def start_transcribe(
        self, call: SimCall, language: str, direction: str, provider: str
    ) -> SimTranscribe:
        """Create a ``progressing`` transcribe on ``call`` and publish ``transcribe_created``."""
        trn = SimTranscribe(
            id=new_id(),
            customer_id=self.world.customer_id,
            reference_type="call",
            reference_id=call.id,
            language=language,
            direction=direction,
            provider=provider,
            tm_create=self.world.clock.now(),
            t_start=time.monotonic(),
            # Production measurement: a transcribe made before the answer never hears anything.
            deaf=call.status != "progressing",
        )
        self.world.transcribes[trn.id] = trn
        self.world.emit("transcribe_created", trn.to_json())
        return trn

    def stop_transcribe(self, trn: SimTranscribe) -> None:
        """``progressing`` -> ``done`` with ``transcribe_done`` (idempotent)."""
        if trn.status != "progressing":
            return
        trn.status = "done"
        trn.tm_update = self.world.clock.now()
        self.world.emit("transcribe_done", trn.to_json())

    def _speech_event(self, trn: SimTranscribe, event_type: str, message: str | None) -> None:
        now = go_time(self.world.clock.now())
        payload: JSON = {
            # A fresh id per speech event (the server's streaming result id).
            "id": new_id(),
            "customer_id": self.world.customer_id,
            "streaming_id": trn.streaming_in,
            "transcribe_id": trn.id,
            "direction": "in",
        }
        if message is not None:
            payload["message"] = message
        payload["tm_event"] = now
        payload["tm_create"] = now
        self.world.emit(event_type, payload)

    def _transcript(self, trn: SimTranscribe, direction: Literal["in", "out"], text: str) -> None:
        tsc = SimTranscript(
            id=new_id(),
            customer_id=self.world.customer_id,
            transcribe_id=trn.id,
            direction=direction,
            message=text,
            offset_ms=int((time.monotonic() - trn.t_start) * 1000),
            tm_create=self.world.clock.now(),
        )
        self.world.transcripts[tsc.id] = tsc
        self.world.emit("transcript_created", tsc.to_json())

    def _hearing(self, call_id: str, direction: Literal["in", "out"]) -> list[SimTranscribe]:
        return [t for t in self.world.transcribes_of(call_id) if t.hears(direction)]

    async def caller_says(self, call: SimCall, text: str) -> None:
        """The caller speaks ``text``: speech started, interims, ended, then the transcript.

        Only transcribes that hear direction ``in`` report anything; the conversation records the
        utterance either way.
        """
        words = text.split()
        t0 = time.monotonic()
        line = Line("caller", text, text, t0)
        call.conversation.append(line)
        self.world.notify()
        started: set[str] = set()

        def start_new() -> list[SimTranscribe]:
            hearing = self._hearing(call.id, "in")
            for trn in hearing:
                if trn.id not in started:
                    started.add(trn.id)
                    self._speech_event(trn, "transcribe_speech_started", None)
            return hearing

        try:
            if words:
                start_new()
            step = 1.0 / self.world.settings.speech_words_per_s
            for k in range(1, len(words) + 1):
                await asyncio.sleep(step)
                for trn in start_new():
                    self._speech_event(trn, "transcribe_speech_interim", " ".join(words[:k]))
            for trn in self._hearing(call.id, "in"):
                if trn.id in started:
                    self._speech_event(trn, "transcribe_speech_ended", None)
                    self._transcript(trn, "in", text)
        finally:
            line.t_end = time.monotonic()
            self.world.notify()

    # == TTS ======================================================================================

    def create_speaking(
        self,
        call: SimCall,
        language: str,
        provider: str,
        voice_id: str,
        direction: str,
    ) -> SimSpeaking:
        """A new session on ``call``: ``active`` now, or ``initiating`` when so configured."""
        now = self.world.clock.now()
        initiating = self.world.settings.speaking_initiating
        spk = SimSpeaking(
            id=new_id(),
            customer_id=self.world.customer_id,
            reference_type="call",
            reference_id=call.id,
            language=language,
            provider=provider,
            voice_id=voice_id,
            direction=direction,
            status="initiating" if initiating else "active",
            tm_create=now,
            tm_update=None if initiating else now,
            deaf=call.status != "progressing",
        )
        self.world.speakings[spk.id] = spk
        if initiating:
            self.world.spawn(self._activate(spk), name=f"sim-speaking-activate-{spk.id}")
        self.world.notify()
        return spk

    async def _activate(self, spk: SimSpeaking) -> None:
        await asyncio.sleep(self.world.settings.speaking_activate_s)
        if spk.status == "initiating":
            spk.status = "active"
            spk.tm_update = self.world.clock.now()
            self.world.notify()

    def say(self, spk: SimSpeaking, text: str) -> None:
        """Queue ``text``; it plays after whatever is already playing or queued."""
        call = self.world.calls.get(spk.reference_id)
        if call is None or spk.deaf or call.status != "progressing":
            # Accepted, but no audio reaches anyone (dead call / session made before answer).
            return
        call.say_seq += 1
        spk.queue.append(SayItem(text, call.say_seq))
        if spk.player is None or spk.player.done():
            spk.player = self.world.spawn(self._player(spk, call), name=f"sim-tts-{spk.id}")
        self.world.notify()

    def flush(self, spk: SimSpeaking) -> None:
        """Provider-dependent flush."""
        kind = spk.flush_kind
        if kind == "gcp":
            spk.queue.clear()
            self._cut(spk, transcribe=True)
        elif kind == "aws":
            spk.queue.clear()
        # elevenlabs: only asks the provider to generate; nothing queued or playing changes.
        self.world.notify()

    def stop(self, spk: SimSpeaking) -> None:
        """Silence at once and mark ``stopped`` (idempotent)."""
        spk.queue.clear()
        self._cut(spk, transcribe=True)
        if spk.status != "stopped":
            spk.status = "stopped"
            spk.tm_update = self.world.clock.now()
        self.world.notify()

    def on_call_hangup(self, call: SimCall) -> None:
        """The call is gone: its audio stops and transcribes end; speakings stay as they are."""
        for spk in self.world.speakings_of(call.id):
            spk.queue.clear()
            self._cut(spk, transcribe=False)
        for trn in self.world.transcribes_of(call.id):
            self.stop_transcribe(trn)

    def _cut(self, spk: SimSpeaking, *, transcribe: bool) -> None:
        """Truncate the playing item at the elapsed fraction and wake its player."""
        item = spk.current
        if item is None or item.line is None:
            return
        self._finish_item(spk, item, cut=True, transcribe=transcribe)
        spk.cut_event.set()

    def _finish_item(self, spk: SimSpeaking, item: SayItem, *, cut: bool, transcribe: bool) -> None:
        line = item.line
        assert line is not None
        now = time.monotonic()
        if cut:
            duration = self._duration(item.text)
            frac = min(1.0, (now - line.t_start) / duration) if duration > 0 else 1.0
            line.text = item.text[: int(len(item.text) * frac)]
            line.cut = True
        else:
            line.text = item.text
        line.t_end = now
        spk.current = None
        if transcribe and line.text.strip():
            # The agent's own audio heard back on an `out`/`both` transcribe.
            for trn in self._hearing(spk.reference_id, "out"):
                self._transcript(trn, "out", line.text)
        self.world.notify()

    def _duration(self, text: str) -> float:
        return len(text) / self.world.settings.playback_chars_per_s

    async def _player(self, spk: SimSpeaking, call: SimCall) -> None:
        """Play queued items back to back, in real time."""
        while spk.queue and spk.status == "active" and call.status == "progressing":
            item = spk.queue.popleft()
            t0 = time.monotonic()
            item.line = Line("agent", "", item.text, t0)
            spk.current = item
            spk.cut_event.clear()
            call.conversation.append(item.line)
            call.play_log.append((item.seq, t0))
            self.world.notify()
            try:
                await asyncio.wait_for(spk.cut_event.wait(), self._duration(item.text))
            except TimeoutError:
                if spk.current is item:
                    self._finish_item(spk, item, cut=False, transcribe=True)
        if call.status != "progressing":
            spk.queue.clear()
        self.world.notify()
