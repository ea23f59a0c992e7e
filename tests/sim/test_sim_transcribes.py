"""Transcribes and transcripts: creation rules, auto-done on hangup, paging."""

from __future__ import annotations

import re
import uuid

import aiohttp
from simhelpers import answered_call, envelope, get, post

from agentd.sim import Caller, Simulator, Utterance
from agentd.sim.clock import year_one_time


def _body(call_id: str, **kw: str) -> dict[str, str]:
    return {
        "reference_type": "call",
        "reference_id": call_id,
        "language": "en-US",
        "direction": "in",
        **kw,
    }


async def test_create_get_list_stop(sim: Simulator, http: aiohttp.ClientSession) -> None:
    call_id = await answered_call(sim, http)
    status, trn, _ = await post(http, sim.api_url + "/transcribes", _body(call_id, provider="aws"))
    assert status == 200
    assert (trn["status"], trn["direction"], trn["provider"]) == ("progressing", "in", "aws")
    assert trn["tm_update"] is None
    assert sim.events[-1] == ("transcribe_created", trn)
    # One per call + language.
    status, data, _ = await post(http, sim.api_url + "/transcribes", _body(call_id))
    assert status == 409
    assert envelope(data) == ("ALREADY_EXISTS", "TRANSCRIBE_ALREADY_PROGRESSING")
    status, other, _ = await post(
        http, sim.api_url + "/transcribes", _body(call_id, language="de-DE")
    )
    assert status == 200
    status, listed, _ = await get(
        http, f"{sim.api_url}/transcribes?reference_type=call&reference_id={call_id}"
    )
    assert {t["id"] for t in listed["result"]} == {trn["id"], other["id"]}
    status, data, _ = await get(http, f"{sim.api_url}/transcribes?reference_id={call_id}")
    assert status == 400
    assert envelope(data) == ("INVALID_ARGUMENT", "INVALID_REFERENCE_FILTER")
    status, got, _ = await get(http, f"{sim.api_url}/transcribes/{trn['id']}")
    assert got["id"] == trn["id"]
    status, stopped, _ = await post(http, f"{sim.api_url}/transcribes/{trn['id']}/stop")
    assert (status, stopped["status"]) == (200, "done")
    assert sim.events[-1][0] == "transcribe_done"
    n_events = len(sim.events)
    status, again, _ = await post(http, f"{sim.api_url}/transcribes/{trn['id']}/stop")
    assert (status, again["status"]) == (200, "done")
    assert len(sim.events) == n_events  # idempotent, no second transcribe_done


async def test_the_language_is_kept_as_bcp47_prints_it(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    # start.go keeps getBCP47LanguageCode(language): canonical case, "-", en-US for nonsense;
    # the 409 compares that
    call_id = await answered_call(sim, http)
    status, trn, _ = await post(
        http, sim.api_url + "/transcribes", _body(call_id, language="ko_kr")
    )
    assert (status, trn["language"]) == (200, "ko-KR")
    status, _, _ = await post(http, sim.api_url + "/transcribes", _body(call_id, language="KO-kr"))
    assert status == 409
    status, trn, _ = await post(
        http, sim.api_url + "/transcribes", _body(call_id, language="korean")
    )
    assert (status, trn["language"]) == (200, "en-US")


async def test_invalid_direction_defaults_to_both(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    call_id = await answered_call(sim, http)
    _, trn, _ = await post(http, sim.api_url + "/transcribes", _body(call_id, direction="sideways"))
    assert trn["direction"] == "both"


async def test_create_failures(sim: Simulator, http: aiohttp.ClientSession) -> None:
    url = sim.api_url + "/transcribes"
    status, data, _ = await post(http, url, _body(str(uuid.uuid4())))
    assert (status, envelope(data)) == (404, ("NOT_FOUND", "CALL_NOT_FOUND"))
    call_id = await answered_call(sim, http)
    status, data, _ = await post(http, url, _body(call_id, reference_type="confbridge"))
    assert (status, envelope(data)[0]) == (400, "INVALID_ARGUMENT")
    status, data, _ = await post(http, url, _body("nope"))
    assert status == 400
    await sim.hangup(call_id)
    status, data, _ = await post(http, url, _body(call_id))
    assert (status, envelope(data)) == (500, ("INTERNAL", "INTERNAL"))
    status, data, _ = await get(http, f"{sim.api_url}/transcribes/{uuid.uuid4()}")
    assert (status, envelope(data)) == (404, ("NOT_FOUND", "TRANSCRIBE_NOT_FOUND"))
    status, data, _ = await get(http, f"{sim.api_url}/transcribes/xyz")
    assert (status, envelope(data)[1]) == (400, "INVALID_ID")


async def test_transcribe_done_when_call_hangs_up(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    call_id = await answered_call(sim, http)
    _, trn, _ = await post(http, sim.api_url + "/transcribes", _body(call_id))
    await sim.hangup(call_id)
    assert sim.transcribes[trn["id"]].status == "done"
    types = [t for t, _ in sim.events]
    assert types.index("transcribe_done") > types.index("call_hangup")
    assert sim.leaks() == []


async def test_a_failed_end_at_hangup_leaves_the_transcribe_progressing_until_stopped(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """transcribehandler/event.go EventCMCallHangup only logs a failed Stop, and the event is
    never redelivered: the transcribe stays progressing (deaf) until a client stops it."""
    call_id = await answered_call(sim, http)
    _, trn, _ = await post(http, sim.api_url + "/transcribes", _body(call_id))
    sim.faults.fail_stt_hangup_end()
    await sim.hangup(call_id)
    assert sim.transcribes[trn["id"]].status == "progressing"
    assert "transcribe_done" not in [t for t, _ in sim.events]
    assert sim.leaks() == [
        {"kind": "transcribe", "id": trn["id"], "call_id": call_id, "status": "progressing"}
    ]
    status, stopped, _ = await post(http, f"{sim.api_url}/transcribes/{trn['id']}/stop", {})
    assert (status, stopped["status"]) == (200, "done")
    assert sim.leaks() == []
    # the fault was for one hangup: the next call's transcribe ends by itself again
    other = await answered_call(sim, http)
    _, trn2, _ = await post(http, sim.api_url + "/transcribes", _body(other))
    await sim.hangup(other)
    assert sim.transcribes[trn2["id"]].status == "done"


async def test_transcripts_paging_newest_first(sim: Simulator, http: aiohttp.ClientSession) -> None:
    # The first utterance waits for the greeting, the others follow without waiting.
    utterances = [Utterance("utterance number 0", pause_s=0.0)] + [
        Utterance(f"utterance number {i}", pause_s=0.0, wait_for_agent=False) for i in (1, 2)
    ]
    call_id = sim.inbound_call(caller=Caller(utterances, hangup_after_s=None))
    await sim.wait_call_status(call_id, "progressing")
    _, trn, _ = await post(http, sim.api_url + "/transcribes", _body(call_id))
    _, spk, _ = await post(
        http,
        sim.api_url + "/speakings",
        {"reference_type": "call", "reference_id": call_id, "direction": "out"},
    )
    await post(http, f"{sim.api_url}/speakings/{spk['id']}/say", {"text": "Hi!"})
    await sim.wait_for(lambda: len(sim.transcripts) == 3)
    url = f"{sim.api_url}/transcripts?transcribe_id={trn['id']}&page_size=2"
    _, page1, _ = await get(http, url)
    assert [t["message"] for t in page1["result"]] == ["utterance number 2", "utterance number 1"]
    assert all(t["direction"] == "in" and isinstance(t["offset_ms"], int) for t in page1["result"])
    assert "tm_transcript" not in page1["result"][0]
    _, page2, _ = await get(http, url + "&page_token=" + page1["next_page_token"])
    assert [t["message"] for t in page2["result"]] == ["utterance number 0"]
    _, page3, _ = await get(http, url + "&page_token=" + page2["next_page_token"])
    assert page3 == {"result": [], "next_page_token": ""}


async def test_legacy_transcripts_carry_tm_transcript_and_ignore_paging(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    sim.settings.legacy_transcripts = True
    call_id = await answered_call(sim, http)
    _, trn, _ = await post(http, sim.api_url + "/transcribes", _body(call_id))
    for i in range(3):
        await sim.caller_says(call_id, f"utterance number {i}")
        await sim.wait_for(lambda n=i + 1: len(sim.transcripts) == n)
    url = f"{sim.api_url}/transcripts?transcribe_id={trn['id']}&page_size=2"
    _, page1, _ = await get(http, url)
    # the page size is ignored: the 100 newest, newest first
    assert [t["message"] for t in page1["result"]] == [f"utterance number {i}" for i in (2, 1, 0)]
    first = page1["result"][0]
    assert "offset_ms" not in first
    assert re.fullmatch(r"0001-01-01T00:00:\d\d(\.\d{1,6})?Z", first["tm_transcript"])
    # and so is the token: the same page again, with the same token
    _, page2, _ = await get(http, url + "&page_token=" + page1["next_page_token"])
    assert page2 == page1


def test_year_one_time_is_gos_zero_time_plus_the_offset() -> None:
    assert year_one_time(8991) == "0001-01-01T00:00:08.991Z"
    assert year_one_time(0) == "0001-01-01T00:00:00Z"
    assert year_one_time(3_600_500) == "0001-01-01T01:00:00.5Z"


async def test_transcripts_errors(sim: Simulator, http: aiohttp.ClientSession) -> None:
    status, data, _ = await get(http, sim.api_url + "/transcripts")
    assert (status, envelope(data)[1]) == (400, "MISSING_REQUEST_PARAMETER")
    status, data, _ = await get(http, f"{sim.api_url}/transcripts?transcribe_id={uuid.uuid4()}")
    assert (status, envelope(data)[1]) == (404, "TRANSCRIBE_NOT_FOUND")
