"""Speech-to-text on a call: transcribes, the caller's speech events and final transcripts."""

from __future__ import annotations

import asyncio
import time
from typing import Literal

from agentd.sim.clock import go_time
from agentd.sim.model import JSON, Line, SimCall, SimTranscribe, SimTranscript, new_id
from agentd.sim.state import World


class Stt:
    """The transcribe manager's behaviour on top of the shared :class:`World`."""

    def __init__(self, world: World) -> None:
        self.world = world

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

    def hear_agent(self, call_id: str, text: str) -> None:
        """The agent's own audio heard back on an ``out``/``both`` transcribe."""
        for trn in self._hearing(call_id, "out"):
            self._transcript(trn, "out", text)

    def on_call_hangup(self, call: SimCall) -> None:
        """The call is gone: its transcribes end by themselves."""
        for trn in self.world.transcribes_of(call.id):
            self.stop_transcribe(trn)
