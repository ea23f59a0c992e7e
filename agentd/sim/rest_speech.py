"""The ``/transcribes``, ``/transcripts`` and ``/speakings`` routes, as the server code behaves.

Mixed into :class:`agentd.sim.rest.RestApi`; what they share with the other routes is in
:mod:`agentd.sim.rest_core`.
"""

from __future__ import annotations

import asyncio
import contextlib

from agentd.sim.errors import ApiError
from agentd.sim.model import SimSpeaking, SimTranscribe
from agentd.sim.rest_core import Req, RestCore, Result, paginate, path_id, uuid_or
from agentd.sim.stt import bcp47
from agentd.sim.tts import Tts

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
        # start.go keeps, and compares for the 409, the language as BCP 47 prints it
        language = bcp47(language)
        for trn in self.world.transcribes_of(call.id):
            if trn.status == "progressing" and trn.language == language:
                raise ApiError(409, "TRANSCRIBE_ALREADY_PROGRESSING", status="ALREADY_EXISTS")
        if self.world.settings.transcribe_start_s > 0:
            await asyncio.sleep(self.world.settings.transcribe_start_s)
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
        # The api-manager lists with ``deleted: false`` (``servicehandler/transcribe.go``).
        items = [t for t in self.world.transcribes.values() if t.tm_delete is None]
        if ref_type:
            items = [t for t in items if t.reference_type == ref_type and t.reference_id == ref_id]
        return 200, paginate(items, lambda t: t.tm_create, query)

    async def get_transcribe(self, req: Req) -> Result:
        """``GET /transcribes/{id}`` (a deleted one too, with its ``tm_delete``)."""
        return 200, self._transcribe(path_id(req)).to_json()

    async def stop_transcribe(self, req: Req) -> Result:
        """``POST /transcribes/{id}/stop`` (idempotent; an orphan stops too, see
        :meth:`agentd.sim.stt.Stt.stop_transcribe`)."""
        trn = self._transcribe(path_id(req))
        self.speech.stop_transcribe(trn)
        return 200, trn.to_json()

    async def delete_transcribe(self, req: Req) -> Result:
        """``DELETE /transcribes/{id}``: stops it if needed, soft-deletes it and its transcripts
        (see :meth:`agentd.sim.stt.Stt.delete_transcribe`); 200 with the deleted transcribe."""
        trn = self._transcribe(path_id(req))
        self.speech.stt.delete_transcribe(trn)
        return 200, trn.to_json()

    async def list_transcripts(self, req: Req) -> Result:
        """``GET /transcripts?transcribe_id=``: paging honoured (since 2026-09), newest first;
        ignored with ``legacy_transcripts``: the 100 newest whatever the page asked for, and
        the ``next_page_token`` of their last (``server/transcripts.go``)."""
        query = req.query
        raw = query.get("transcribe_id", "")
        if not raw:
            raise ApiError(400, "MISSING_REQUEST_PARAMETER", "transcribe_id is required.")
        trn_id = uuid_or(raw, 400, "INVALID_REQUEST_PARAMETER", "transcribe_id")
        self._transcribe(trn_id)
        # ``deleted: false`` (``servicehandler/transcript.go``): a deleted transcribe's are gone.
        items = [
            t
            for t in self.world.transcripts.values()
            if t.transcribe_id == trn_id and t.tm_delete is None
        ]
        paging = {} if self.world.settings.legacy_transcripts else query
        return 200, paginate(items, lambda t: t.tm_create, paging)

    # -- speakings --------------------------------------------------------------------------------

    def _speaking(self, spk_id: str) -> SimSpeaking:
        spk = self.world.speakings.get(spk_id)
        if spk is None:
            raise ApiError(404, "RESOURCE_NOT_FOUND")
        return spk

    async def post_speakings(self, req: Req) -> Result:
        """``POST /speakings``: 201 ``active`` after the setup (``Tts.setup``); 500 on a second
        live session (deleted rows do not count: ``speakinghandler/speaking.go`` filters
        ``deleted: false``) or a dead call. ``provider`` ``""`` is stored as ``elevenlabs``."""
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
        if call is None or call.ending:
            raise ApiError(500, "INTERNAL")
        if any(
            s.status in ("initiating", "active") and s.tm_delete is None
            for s in self.world.speakings_of(ref_id)
        ):
            raise ApiError(500, "INTERNAL")
        spk = self.speech.create_speaking(
            call, strings["language"], strings["provider"], strings["voice_id"], str(direction)
        )
        await self.speech.tts.setup(spk, call)
        return 201, spk.to_json()

    async def list_speakings(self, req: Req) -> Result:
        """``GET /speakings``: the ``{result, next_page_token}`` shape (the spec says an array)."""
        items = [s for s in self.world.speakings.values() if s.tm_delete is None]
        return 200, paginate(items, lambda s: s.tm_create, req.query)

    async def get_speaking(self, req: Req) -> Result:
        """``GET /speakings/{id}`` (a deleted one too: ``SpeakingGet`` does not filter)."""
        return 200, self._speaking(path_id(req)).to_json()

    async def delete_speaking(self, req: Req) -> Result:
        """``DELETE /speakings/{id}``: a pod-routed stop of a live row, then the soft delete.

        ``bin-api-manager/pkg/servicehandler/speaking.go`` SpeakingDelete ignores a failed stop
        (a dead pod: after the RPC budget, or at once with the breaker open) and deletes through
        the shared queue, so the row of a dead pod ends ``active`` with ``tm_delete`` set: it no
        longer blocks a new session on the call, and it is never stopped (still billed).
        ``dbhandler/speaking.go`` SpeakingDelete sets ``tm_delete`` and ``tm_update`` each time.
        """
        spk = self._speaking(path_id(req))
        if spk.status in ("initiating", "active"):
            with contextlib.suppress(ApiError):
                await self.speech.tts.stop_via_pod(spk)
        now = self.world.clock.now()
        spk.tm_delete = spk.tm_update = now
        self.world.notify()
        return 200, spk.to_json()

    async def say(self, req: Req) -> Result:
        """``POST /speakings/{id}/say``: 400 empty or > 5,000 bytes (gateway); then routed to the
        pod (503 when it is gone, see ``Tts.reach_pod``); 404 unless active or when the provider
        refuses the voice or text (``v1_speakings.go`` maps every say error to 404)."""
        spk_id = path_id(req)
        body = req.json()
        text = body.get("text")
        if not isinstance(text, str) or not text:
            raise ApiError(400, "INVALID_ARGUMENT", "text is required.")
        if len(text.encode("utf-8")) > SAY_MAX_BYTES:
            raise ApiError(400, "INVALID_ARGUMENT", "text exceeds the 5000 character limit.")
        # The gateway checks the body (server/speakings.go) before it looks the row up.
        spk = self._speaking(spk_id)
        tts = self.speech.tts
        await tts.reach_pod(spk)
        if tts.say_refused(spk, text):
            raise ApiError(404, "RESOURCE_NOT_FOUND")
        before = spk.to_json()
        blocks = tts.say_blocks_s(spk, text)
        self.speech.say(spk, text)
        if blocks > 0:
            await _hold_say(tts, spk, blocks, self.world.settings.pod_rpc_timeout_s)
        return 200, before

    async def flush(self, req: Req) -> Result:
        """``POST /speakings/{id}/flush``: routed to the pod; provider-dependent; 404 unless
        active, and once the call's audio is gone (``Tts.vendor_gone``: the row still says
        ``active``)."""
        spk = self._speaking(path_id(req))
        await self.speech.tts.reach_pod(spk)
        if spk.status != "active" or self.speech.tts.vendor_gone(spk):
            raise ApiError(404, "RESOURCE_NOT_FOUND")
        self.speech.flush(spk)
        return 200, spk.to_json()

    async def stop_speaking(self, req: Req) -> Result:
        """``POST /speakings/{id}/stop``: routed to the pod; silences and answers after the stop
        latency; idempotent."""
        spk = self._speaking(path_id(req))
        await self.speech.tts.stop_via_pod(spk)
        return 200, spk.to_json()


async def _hold_say(tts: Tts, spk: SimSpeaking, blocks_s: float, budget_s: float) -> None:
    """``aws.go`` ``SayAdd`` waits for room in its audio buffer inside the request: past the
    gateway's budget the say answers 503 (a breaker failure) while its audio still plays."""
    await asyncio.sleep(min(blocks_s, budget_s))
    if blocks_s > budget_s:
        tts.pod_timed_out(spk)
        raise ApiError(503, "REQUEST_TIMEOUT", "The request timed out.")
