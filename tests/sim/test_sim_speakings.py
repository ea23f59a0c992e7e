"""Speakings: creation rules, say/flush/stop errors, initiating mode, the hangup leak."""

from __future__ import annotations

import uuid

import aiohttp
from simhelpers import answered_call, envelope, fast_settings, get, post

from agentd.sim import Simulator


def _body(call_id: str, **kw: str) -> dict[str, str]:
    return {
        "reference_type": "call",
        "reference_id": call_id,
        "language": "en-US",
        "provider": "elevenlabs",
        "direction": "out",
        **kw,
    }


async def test_create_is_201_active_and_unique(sim: Simulator, http: aiohttp.ClientSession) -> None:
    call_id = await answered_call(sim, http)
    status, spk, _ = await post(http, sim.api_url + "/speakings", _body(call_id))
    assert (status, spk["status"]) == (201, "active")
    assert spk["reference_id"] == call_id
    status, data, _ = await post(http, sim.api_url + "/speakings", _body(call_id))
    assert (status, envelope(data)) == (500, ("INTERNAL", "INTERNAL"))
    status, stopped, _ = await post(http, f"{sim.api_url}/speakings/{spk['id']}/stop")
    assert (status, stopped["status"]) == (200, "stopped")
    status, again, _ = await post(http, f"{sim.api_url}/speakings/{spk['id']}/stop")
    assert (status, again["status"]) == (200, "stopped")  # idempotent
    status, spk2, _ = await post(http, sim.api_url + "/speakings", _body(call_id))
    assert status == 201
    _, listed, _ = await get(http, sim.api_url + "/speakings")
    assert {s["id"] for s in listed["result"]} == {spk["id"], spk2["id"]}
    assert "next_page_token" in listed
    _, got, _ = await get(http, f"{sim.api_url}/speakings/{spk2['id']}")
    assert got["status"] == "active"


async def test_create_failures(sim: Simulator, http: aiohttp.ClientSession) -> None:
    url = sim.api_url + "/speakings"
    status, data, _ = await post(http, url, _body(str(uuid.uuid4())))
    assert (status, envelope(data)[1]) == (500, "INTERNAL")
    call_id = await answered_call(sim, http)
    status, data, _ = await post(http, url, _body(call_id, direction="sideways"))
    assert (status, envelope(data)[0]) == (400, "INVALID_ARGUMENT")
    status, data, _ = await post(http, url, _body(call_id, reference_type="nope"))
    assert status == 400
    await sim.hangup(call_id)
    status, data, _ = await post(http, url, _body(call_id))
    assert (status, envelope(data)[1]) == (500, "INTERNAL")


async def test_say_flush_stop_errors(sim: Simulator, http: aiohttp.ClientSession) -> None:
    call_id = await answered_call(sim, http)
    _, spk, _ = await post(http, sim.api_url + "/speakings", _body(call_id))
    base = f"{sim.api_url}/speakings/{spk['id']}"
    status, before, _ = await post(http, base + "/say", {"text": "Hello."})
    assert (status, before["status"]) == (200, "active")
    status, data, _ = await post(http, base + "/say", {"text": ""})
    assert (status, envelope(data)[0]) == (400, "INVALID_ARGUMENT")
    # The limit is 5,000 bytes, not characters: 2,501 two-byte characters are too long.
    status, data, _ = await post(http, base + "/say", {"text": "é" * 2501})
    assert status == 400
    assert "5000" in data["error"]["message"]
    status, _, _ = await post(http, base + "/flush")
    assert status == 200
    await post(http, base + "/stop")
    status, data, _ = await post(http, base + "/say", {"text": "Too late."})
    assert (status, envelope(data)) == (404, ("NOT_FOUND", "RESOURCE_NOT_FOUND"))
    status, data, _ = await post(http, base + "/flush")
    assert status == 404
    unknown = f"{sim.api_url}/speakings/{uuid.uuid4()}"
    for suffix in ("", "/say", "/flush", "/stop"):
        if suffix:
            status, data, _ = await post(http, unknown + suffix, {"text": "x"})
        else:
            status, data, _ = await get(http, unknown)
        assert (status, envelope(data)[1]) == (404, "RESOURCE_NOT_FOUND"), suffix
    status, data, _ = await get(http, f"{sim.api_url}/speakings/bad-id")
    assert (status, envelope(data)[1]) == (400, "INVALID_ID")


async def test_exactly_5000_bytes_is_accepted(sim: Simulator, http: aiohttp.ClientSession) -> None:
    call_id = await answered_call(sim, http)
    _, spk, _ = await post(http, sim.api_url + "/speakings", _body(call_id))
    status, _, _ = await post(
        http, f"{sim.api_url}/speakings/{spk['id']}/say", {"text": "a" * 5000}
    )
    assert status == 200


async def test_initiating_mode() -> None:
    settings = fast_settings(speaking_initiating=True, speaking_activate_s=0.05)
    async with (
        Simulator(settings) as sim,
        aiohttp.ClientSession(headers={"Cookie": f"accesskey={sim.accesskey}"}) as http,
    ):
        call_id = await answered_call(sim, http)
        status, spk, _ = await post(http, sim.api_url + "/speakings", _body(call_id))
        assert (status, spk["status"]) == (201, "initiating")
        say_url = f"{sim.api_url}/speakings/{spk['id']}/say"
        status, _, _ = await post(http, say_url, {"text": "hi"})
        assert status == 404
        await sim.wait_for(lambda: sim.speakings[spk["id"]].status == "active")
        status, _, _ = await post(http, say_url, {"text": "hi"})
        assert status == 200


async def test_speaking_survives_hangup_as_a_leak(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    call_id = await answered_call(sim, http)
    _, spk, _ = await post(http, sim.api_url + "/speakings", _body(call_id))
    await sim.hangup(call_id)
    _, got, _ = await get(http, f"{sim.api_url}/speakings/{spk['id']}")
    assert got["status"] == "active"
    assert sim.leaks() == [
        {"kind": "speaking", "id": spk["id"], "call_id": call_id, "status": "active"}
    ]
    # The pod tore its provider session down with the call's audio: a say fails (404), though
    # the row still says active and bills
    status, _, _ = await post(http, f"{sim.api_url}/speakings/{spk['id']}/say", {"text": "Hello?"})
    assert status == 404
    assert all(line.who != "agent" for line in sim.get_call(call_id).conversation)
    # and so does a flush (no provider config left to flush), while a stop still stops it
    status, data, _ = await post(http, f"{sim.api_url}/speakings/{spk['id']}/flush")
    assert (status, envelope(data)[1]) == (404, "RESOURCE_NOT_FOUND")
    status, data, _ = await post(http, f"{sim.api_url}/speakings/{spk['id']}/stop")
    assert (status, data["status"]) == (200, "stopped")
    assert sim.leaks() == []


async def test_no_speaking_events_are_published(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    call_id = await answered_call(sim, http)
    _, spk, _ = await post(http, sim.api_url + "/speakings", _body(call_id))
    await post(http, f"{sim.api_url}/speakings/{spk['id']}/say", {"text": "Hi."})
    await post(http, f"{sim.api_url}/speakings/{spk['id']}/stop")
    assert not [t for t, _ in sim.events if not t.startswith(("call_", "transcri"))]
