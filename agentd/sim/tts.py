"""Text-to-speech on a call: speaking sessions and the real-time playback of ``/say`` text.

Playback is real time: a say takes ``len(text) / playback_chars_per_s`` seconds and says play
back to back. What was heard is recorded in the call's conversation, truncated where the audio
was cut (``/stop``, a ``gcp`` flush, or the hangup). Flush follows the provider (docs/protocol.md
§8.2): ``gcp`` cuts and drops the queue, ``aws`` drops only what has not started,
``elevenlabs`` changes nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from agentd.sim.model import Line, SayItem, SimCall, SimSpeaking, new_id
from agentd.sim.state import World


class Tts:
    """The tts manager's behaviour on top of the shared :class:`World`."""

    def __init__(self, world: World, echo: Callable[[str, str], None]) -> None:
        self.world = world
        # what the agent said, heard back by the call's transcribes: (call id, text)
        self._echo = echo

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
            self._echo(spk.reference_id, line.text)
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

    def on_call_hangup(self, call: SimCall) -> None:
        """The call is gone: its audio stops; its speakings stay as they are (and bill)."""
        for spk in self.world.speakings_of(call.id):
            spk.queue.clear()
            self._cut(spk, transcribe=False)
