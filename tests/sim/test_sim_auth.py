"""Credentials: access keys, JWTs, login at the root path, expiry."""

from __future__ import annotations

import aiohttp
import pytest
import websockets
from simhelpers import envelope, get, recv_json, subscribe, ws_connect

from agentd.sim import Simulator


async def _status(sim: Simulator, path: str = "/customer", **kwargs: object) -> tuple[int, object]:
    async with (
        aiohttp.ClientSession() as s,
        s.get(sim.api_url + path, **kwargs) as resp,  # type: ignore[arg-type]
    ):
        text = await resp.text()
        return resp.status, (await resp.json() if text else None)


async def test_accesskey_in_query_and_cookie(sim: Simulator) -> None:
    status, data = await _status(sim, params={"accesskey": sim.accesskey})
    assert status == 200
    assert isinstance(data, dict) and data["id"] == sim.customer_id
    status, _ = await _status(sim, headers={"Cookie": f"accesskey={sim.accesskey}"})
    assert status == 200


async def test_jwt_in_query_bearer_and_cookie(sim: Simulator) -> None:
    token = sim.make_token()
    assert (await _status(sim, params={"token": token}))[0] == 200
    assert (await _status(sim, headers={"Authorization": f"Bearer {token}"}))[0] == 200
    assert (await _status(sim, headers={"Cookie": f"token={token}"}))[0] == 200


async def test_accesskey_in_token_param_is_refused(sim: Simulator) -> None:
    status, data = await _status(sim, params={"token": sim.accesskey})
    assert status == 401
    assert envelope(data) == ("UNAUTHENTICATED", "INVALID_CREDENTIALS")
    status, _ = await _status(sim, headers={"Authorization": f"Bearer {sim.accesskey}"})
    assert status == 401


async def test_missing_wrong_and_expired_credentials(sim: Simulator) -> None:
    status, data = await _status(sim)
    assert status == 401
    assert envelope(data) == ("UNAUTHENTICATED", "AUTHENTICATION_REQUIRED")
    status, data = await _status(sim, params={"accesskey": "vb_wrong"})
    assert envelope(data) == ("UNAUTHENTICATED", "INVALID_CREDENTIALS")
    status, data = await _status(sim, params={"token": sim.make_token(ttl_s=-1)})
    assert status == 401
    assert envelope(data) == ("UNAUTHENTICATED", "INVALID_CREDENTIALS")
    # A tampered signature is refused too.
    token = sim.make_token()
    status, _ = await _status(sim, params={"token": token[:-2] + "xx"})
    assert status == 401


async def test_first_credential_wins_even_when_invalid(sim: Simulator) -> None:
    status, _ = await _status(
        sim,
        params={"accesskey": sim.accesskey},
        headers={"Cookie": "token=garbage"},
    )
    assert status == 401


async def test_login_at_root_path(sim: Simulator) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(
            sim.base_url + "/auth/login", json={"username": "demo", "password": "demo"}
        ) as resp:
            assert resp.status == 200
            data = await resp.json()
            assert data["username"] == "demo"
            assert "HttpOnly" in resp.headers["Set-Cookie"]
        token = data["token"]
        async with s.get(sim.api_url + "/customer", params={"token": token}) as resp:
            assert resp.status == 200
        async with s.post(
            sim.base_url + "/auth/login", json={"username": "demo", "password": "nope"}
        ) as resp:
            assert resp.status == 400
            assert await resp.read() == b""  # bare 400, no envelope
        async with s.post(sim.base_url + "/auth/login", data=b"{not json") as resp:
            assert resp.status == 400
        async with s.post(
            sim.api_url + "/auth/login", json={"username": "demo", "password": "demo"}
        ) as resp:
            assert resp.status == 404
            assert envelope(await resp.json()) == ("NOT_FOUND", "ROUTE_NOT_FOUND")
    # The password is never recorded.
    logins = sim.requests_matching("POST", r"^/auth/login$")
    assert logins and all(r.body["password"] == "***" for r in logins if r.body)


async def test_query_credentials_are_redacted_in_records(sim: Simulator) -> None:
    await _status(sim, params={"accesskey": sim.accesskey, "x": "1"})
    rec = sim.requests_matching("GET", r"/customer$")[-1]
    assert rec.query == {"accesskey": "***", "x": "1"}
    assert rec.path == "/v1.0/customer"
    assert rec.status == 200


async def test_expired_tokens_refused_but_open_ws_stays_open(sim: Simulator) -> None:
    token = sim.make_token()
    async with websockets.connect(f"{sim.ws_url}?token={token}") as ws:
        topic = f"customer_id:{sim.customer_id}:call:call_created"
        await subscribe(sim, ws, [topic])
        sim.faults.expire_tokens()
        assert (await _status(sim, params={"token": token}))[0] == 401
        # Access keys are not JWTs: unaffected.
        assert (await _status(sim, params={"accesskey": sim.accesskey}))[0] == 200
        # The open connection still delivers events.
        call_id = sim.inbound_call()
        frame = await recv_json(ws)
        assert frame["id"] == call_id
        # A reconnect with the old token fails at the upgrade.
        with pytest.raises(websockets.InvalidStatus) as info:
            await websockets.connect(f"{sim.ws_url}?token={token}")
        assert info.value.response.status_code == 401
    # A fresh token works again.
    assert (await _status(sim, params={"token": sim.make_token()}))[0] == 200


async def test_a_revoked_access_key_is_refused_but_an_open_ws_stays_open(sim: Simulator) -> None:
    ws = await ws_connect(sim)
    try:
        await subscribe(sim, ws, [f"customer_id:{sim.customer_id}:call:call_created"])
        sim.auth.revoke_accesskey()
        status, data = await _status(sim, params={"accesskey": sim.accesskey})
        assert status == 401
        assert envelope(data) == ("UNAUTHENTICATED", "INVALID_CREDENTIALS")
        call_id = sim.inbound_call()
        assert (await recv_json(ws))["id"] == call_id
        with pytest.raises(websockets.InvalidStatus) as info:
            await websockets.connect(
                sim.ws_url, additional_headers={"Cookie": f"accesskey={sim.accesskey}"}
            )
        assert info.value.response.status_code == 401
    finally:
        await ws.close()
    # JWTs are not access keys: unaffected
    assert (await _status(sim, params={"token": sim.make_token()}))[0] == 200


async def test_ws_upgrade_requires_credentials(sim: Simulator) -> None:
    with pytest.raises(websockets.InvalidStatus) as info:
        await websockets.connect(sim.ws_url)
    assert info.value.response.status_code == 401
    with pytest.raises(websockets.InvalidStatus) as info:
        await websockets.connect(f"{sim.ws_url}?token={sim.accesskey}")
    assert info.value.response.status_code == 401
    ws = await ws_connect(sim)
    await ws.close()


async def test_plain_get_on_ws_path_is_400(sim: Simulator, http: aiohttp.ClientSession) -> None:
    status, _, _ = await get(http, sim.ws_url.replace("ws://", "http://"))
    assert status == 400
