"""Audio on a call: the STT (:mod:`agentd.sim.stt`) and TTS (:mod:`agentd.sim.tts`) managers.

One facade, so the REST routes and the call flows need not know which manager serves what.
"""

from __future__ import annotations

from agentd.sim.model import SimCall, SimSpeaking, SimTranscribe
from agentd.sim.state import World
from agentd.sim.stt import Stt
from agentd.sim.tts import Tts


class Speech:
    """The transcribe and tts managers of one simulator."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.stt = Stt(world)
        self.tts = Tts(world, self.stt.hear_agent)

    def start_transcribe(
        self, call: SimCall, language: str, direction: str, provider: str
    ) -> SimTranscribe:
        """See :meth:`Stt.start_transcribe`."""
        return self.stt.start_transcribe(call, language, direction, provider)

    def stop_transcribe(self, trn: SimTranscribe) -> None:
        """See :meth:`Stt.stop_transcribe`."""
        self.stt.stop_transcribe(trn)

    async def caller_says(self, call: SimCall, text: str) -> None:
        """See :meth:`Stt.caller_says`."""
        await self.stt.caller_says(call, text)

    def create_speaking(
        self, call: SimCall, language: str, provider: str, voice_id: str, direction: str
    ) -> SimSpeaking:
        """See :meth:`Tts.create_speaking`."""
        return self.tts.create_speaking(call, language, provider, voice_id, direction)

    def say(self, spk: SimSpeaking, text: str) -> None:
        """See :meth:`Tts.say`."""
        self.tts.say(spk, text)

    def flush(self, spk: SimSpeaking) -> None:
        """See :meth:`Tts.flush`."""
        self.tts.flush(spk)

    def stop(self, spk: SimSpeaking) -> None:
        """See :meth:`Tts.stop`."""
        self.tts.stop(spk)

    def on_call_hangup(self, call: SimCall) -> None:
        """The call is gone: audio stops and transcribes end; speakings stay (and bill)."""
        self.tts.on_call_hangup(call)
        self.stt.on_call_hangup(call)
