"""The ``/transcribes``, ``/transcripts`` and ``/speakings`` routes, as the server code behaves.

Mixed into :class:`agentd.sim.rest.RestApi`; what they share with the other routes is in
:mod:`agentd.sim.rest_core`.
"""

from __future__ import annotations

from agentd.sim.errors import ApiError
from agentd.sim.model import SimSpeaking, SimTranscribe
from agentd.sim.rest_core import Req, RestCore, Result, paginate, path_id, uuid_or

#: Go's ``len(text)`` limit on ``/say`` (bytes, not characters).
SAY_MAX_BYTES = 5000


class SpeechRoutes(RestCore):
    """The transcribe, transcript and speaking handlers."""

    # -- transcribes ------------------------------------------------------------------------------

    def _transcribe(self, trn_id: str) -> SimTranscribe:
        trn = self.world.transcribes.get(trn_id)
        if trn is None:
            raise ApiError(404, "TRANSCRIBE_NOT_FOUND")
        return trn

    async def post_transcribes(self, req: Req) -> Result:
        """``POST /transcribes``: 200 ``progressing``; 409 when one runs for the call+language."""
        body = req.json()
        ref_type = body.get("reference_type")
        if ref_type not in ("call", "conference", "recording"):
            # The spec's `confbridge` is refused by the handler (it wants `conference`).
            raise ApiError(400, "INVALID_ARGUMENT", "reference_type is invalid.")
        ref_id = uuid_or(body.get("reference_id"), 400, "INVALID_ARGUMENT", "reference_id")
        language = body.get("language")
        if not isinstance(language, str) or not language:
            raise ApiError(400, "INVALID_ARGUMENT", "language is required.")
        direction = body.get("direction")
        if direction not in ("both", "in", "out"):
            direction = "both"
        provider = body.get("provider", "")
        if provider not in ("", "gcp", "aws"):
            raise ApiError(400, "INVALID_ARGUMENT", "provider is invalid.")
        if ref_type != "call":
            raise ApiError(404, "RESOURCE_NOT_FOUND")
        call = self._call(ref_id)
        if call.status not in ("dialing", "ringing", "progressing"):
            raise ApiError(500, "INTERNAL")
        for trn in self.world.transcribes_of(call.id):
            if trn.status == "progressing" and trn.language == language:
                raise ApiError(409, "TRANSCRIBE_ALREADY_PROGRESSING", status="ALREADY_EXISTS")
        trn = self.speech.start_transcribe(call, language, str(direction), str(provider))
        return 200, trn.to_json()

    async def list_transcribes(self, req: Req) -> Result:
        """``GET /transcribes`` (``reference_type`` and ``reference_id``: both or neither)."""
        query = req.query
        ref_type = query.get("reference_type", "")
        ref_id = query.get("reference_id", "")
        if bool(ref_type) != bool(ref_id):
            raise ApiError(
                400,
                "INVALID_REFERENCE_FILTER",
                "reference_type and reference_id must be given together.",
            )
        items = list(self.world.transcribes.values())
        if ref_type:
            items = [t for t in items if t.reference_type == ref_type and t.reference_id == ref_id]
        return 200, paginate(items, lambda t: t.tm_create, query)

    async def get_transcribe(self, req: Req) -> Result:
        """``GET /transcribes/{id}``."""
        return 200, self._transcribe(path_id(req)).to_json()

    async def stop_transcribe(self, req: Req) -> Result:
        """``POST /transcribes/{id}/stop`` (idempotent)."""
        trn = self._transcribe(path_id(req))
        self.speech.stop_transcribe(trn)
        return 200, trn.to_json()

    async def list_transcripts(self, req: Req) -> Result:
        """``GET /transcripts?transcribe_id=``: paging honoured (since 2026-09), newest first."""
        query = req.query
        raw = query.get("transcribe_id", "")
        if not raw:
            raise ApiError(400, "MISSING_REQUEST_PARAMETER", "transcribe_id is required.")
        trn_id = uuid_or(raw, 400, "INVALID_REQUEST_PARAMETER", "transcribe_id")
        self._transcribe(trn_id)
        items = [t for t in self.world.transcripts.values() if t.transcribe_id == trn_id]
        return 200, paginate(items, lambda t: t.tm_create, query)

    # -- speakings --------------------------------------------------------------------------------

    def _speaking(self, spk_id: str) -> SimSpeaking:
        spk = self.world.speakings.get(spk_id)
        if spk is None:
            raise ApiError(404, "RESOURCE_NOT_FOUND")
        return spk

    async def post_speakings(self, req: Req) -> Result:
        """``POST /speakings``: 201 ``active``; 500 on a second live session or a dead call."""
        body = req.json()
        ref_type = body.get("reference_type")
        if ref_type not in ("call", "confbridge"):
            raise ApiError(400, "INVALID_ARGUMENT", "reference_type is invalid.")
        ref_id = uuid_or(body.get("reference_id"), 400, "INVALID_ARGUMENT", "reference_id")
        direction = body.get("direction", "")
        if direction not in ("", "in", "out", "both"):
            raise ApiError(400, "INVALID_ARGUMENT", "direction is invalid.")
        strings = {}
        for key in ("language", "provider", "voice_id"):
            value = body.get(key, "")
            if not isinstance(value, str):
                raise ApiError(400, "INVALID_ARGUMENT", f"{key} must be a string.")
            strings[key] = value
        # tts-manager answers a bare 500 for everything below (the gateway maps it to INTERNAL).
        call = self.world.calls.get(ref_id) if ref_type == "call" else None
        if call is None or call.status in ("hangup", "terminating", "canceling"):
            raise ApiError(500, "INTERNAL")
        if any(s.status in ("initiating", "active") for s in self.world.speakings_of(ref_id)):
            raise ApiError(500, "INTERNAL")
        spk = self.speech.create_speaking(
            call, strings["language"], strings["provider"], strings["voice_id"], str(direction)
        )
        return 201, spk.to_json()

    async def list_speakings(self, req: Req) -> Result:
        """``GET /speakings``: the ``{result, next_page_token}`` shape (the spec says an array)."""
        items = [s for s in self.world.speakings.values() if s.tm_delete is None]
        return 200, paginate(items, lambda s: s.tm_create, req.query)

    async def get_speaking(self, req: Req) -> Result:
        """``GET /speakings/{id}``."""
        return 200, self._speaking(path_id(req)).to_json()

    async def delete_speaking(self, req: Req) -> Result:
        """``DELETE /speakings/{id}``: stops first, then soft-deletes."""
        spk = self._speaking(path_id(req))
        self.speech.stop(spk)
        if spk.tm_delete is None:
            spk.tm_delete = self.world.clock.now()
        return 200, spk.to_json()

    async def say(self, req: Req) -> Result:
        """``POST /speakings/{id}/say``: queue; 404 unless active; 400 empty or > 5,000 bytes."""
        spk = self._speaking(path_id(req))
        body = req.json()
        text = body.get("text")
        if not isinstance(text, str) or not text:
            raise ApiError(400, "INVALID_ARGUMENT", "text is required.")
        if len(text.encode("utf-8")) > SAY_MAX_BYTES:
            raise ApiError(400, "INVALID_ARGUMENT", "text exceeds the 5000 character limit.")
        if spk.status != "active":
            raise ApiError(404, "RESOURCE_NOT_FOUND")
        before = spk.to_json()
        self.speech.say(spk, text)
        return 200, before

    async def flush(self, req: Req) -> Result:
        """``POST /speakings/{id}/flush``: provider-dependent; 404 unless active."""
        spk = self._speaking(path_id(req))
        if spk.status != "active":
            raise ApiError(404, "RESOURCE_NOT_FOUND")
        self.speech.flush(spk)
        return 200, spk.to_json()

    async def stop_speaking(self, req: Req) -> Result:
        """``POST /speakings/{id}/stop``: silences at once; idempotent."""
        spk = self._speaking(path_id(req))
        self.speech.stop(spk)
        return 200, spk.to_json()
