"""`agentd check-config`: the real CLI against the simulator and stub backends over loopback."""

from __future__ import annotations

import asyncio
import re
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from agentd import stores
from agentd.sim import Simulator
from tests.stubs import HttpStub, OpenAIStub, Script
from tests.support import run_cli

if TYPE_CHECKING:
    from tests.pg import PgServer

pytest_plugins = ["tests.pg"]  # a real PostgreSQL for the [store] url checks
# one `agentd check-config` process per test
pytestmark = pytest.mark.slow

CONFIG = """
[voipbin]
api_url = "{api}"
accesskey_file = "{keyfile}"
timeout_s = 2
[agent]
numbers = ["+15551234567"]
[backend]
{backend}
[store]
{store}
"""


def write(
    tmp_path: Path,
    sim: Simulator,
    key: str,
    backend: str = 'kind = "echo"',
    store: str | None = None,
) -> Path:
    keyfile = tmp_path / "accesskey"
    keyfile.write_text(key + "\n")
    path = tmp_path / "agentd.toml"
    if store is None:
        store = f'path = "{tmp_path / "agentd.db"}"'
    path.write_text(CONFIG.format(api=sim.api_url, keyfile=keyfile, backend=backend, store=store))
    return path


async def check(config: Path) -> tuple[int, list[str]]:
    code, out, err = await run_cli("check-config", "--config", str(config))
    return code, (out + err).splitlines()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_good_config_passes_every_check(sim: Simulator, tmp_path: Path) -> None:
    config = write(tmp_path, sim, sim.accesskey)
    code, lines = await check(config)
    assert code == 0, lines
    customer = sim.requests_matching("GET", r"/customer$")
    assert len(customer) == 1 and customer[0].status == 200
    assert lines[0] == f"config: ok ({config})"
    assert lines[1] == f"store: ok (sqlite {tmp_path / 'agentd.db'}, created at the first start)"
    assert lines[2].startswith("voipbin: ok, customer ") and lines[2].endswith(f"at {sim.api_url}")
    assert lines[3] == "backend: ok (echo, nothing to check)"
    assert len(lines) == 4


async def test_a_wrong_access_key_fails_without_printing_it(sim: Simulator, tmp_path: Path) -> None:
    wrong = "vb_wrongkey0123456789"
    code, lines = await check(write(tmp_path, sim, wrong))
    assert code == 1, lines
    failed = [line for line in lines if line.startswith("voipbin: FAILED")]
    assert len(failed) == 1 and "401" in failed[0]
    assert lines[-1] == "backend: ok (echo, nothing to check)"  # the other checks still ran
    text = "\n".join(lines)
    assert wrong not in text and "wrongkey" not in text
    assert sim.accesskey not in text


async def test_a_refused_login_names_the_login_request_and_what_to_check(
    sim: Simulator, tmp_path: Path
) -> None:
    config = write(tmp_path, sim, sim.accesskey)
    password = tmp_path / "password"
    password.write_text("Wrong-Password-42\n")
    config.write_text(
        config.read_text().replace(
            f'accesskey_file = "{tmp_path / "accesskey"}"',
            f'username = "{sim.settings.username}"\npassword_file = "{password}"',
        )
    )
    code, lines = await check(config)
    assert code == 1, lines
    (failed,) = [line for line in lines if line.startswith("voipbin: FAILED")]
    # VoIPBIN's bare 400 for a login, not a GET /customer that was never answered 400
    assert failed == (
        "voipbin: FAILED: HTTP 400 LOGIN_FAILED login refused: check voipbin.username and "
        f"voipbin.password (POST {sim.base_url}/auth/login)"
    )
    assert "Wrong-Password" not in "\n".join(lines)


async def test_a_login_without_customer_rights_names_the_permission(
    sim: Simulator, tmp_path: Path
) -> None:
    sim.faults.fail("GET", r"/customer$", 403)  # an agent with only CustomerAgent rights
    code, lines = await check(write(tmp_path, sim, sim.accesskey))
    assert code == 1, lines
    (failed,) = [line for line in lines if line.startswith("voipbin: FAILED")]
    assert failed.startswith("voipbin: FAILED: HTTP 403 PERMISSION_DENIED the login lacks the ")
    assert "CustomerAdmin or CustomerManager permission" in failed
    assert len(sim.requests_matching("GET", r"/customer$")) == 1  # a 403 is not retried


async def test_an_unreachable_voipbin_says_where_it_could_not_connect(
    sim: Simulator, tmp_path: Path
) -> None:
    port = closed_port()
    config = write(tmp_path, sim, sim.accesskey)
    config.write_text(config.read_text().replace(sim.api_url, f"http://127.0.0.1:{port}/v1.0"))
    code, out, err = await run_cli("check-config", "--config", str(config))
    assert code == 1, out + err
    assert err == ""  # no warning per retry among the checks
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["config", "store", "voipbin", "backend"]
    failed = lines[2]
    assert failed.startswith(
        f"voipbin: FAILED: ClientConnectorError: cannot connect to 127.0.0.1:{port}: "
        f"Connection refused (GET http://127.0.0.1:{port}/v1.0/customer, tried "
    )
    tried = re.search(r", tried (\d+) times in \d+\.\d s\)$", failed)
    assert tried is not None and int(tried[1]) >= 2, failed  # retried, then given up
    assert "HTTP 0" not in failed


async def test_the_service_credentials_are_found_beside_a_config_outside_etc_agentd(
    sim: Simulator, tmp_path: Path
) -> None:
    # `make install CONF_DIR=/srv/agentd-etc`: the unit loads $(CONF_DIR)/credentials/*, and
    # the installed config names no key (the example says: put it in the credential)
    conf_dir = tmp_path / "srv" / "agentd-etc"
    (conf_dir / "credentials").mkdir(parents=True, mode=0o700)
    (conf_dir / "credentials" / "voipbin-accesskey").write_text(sim.accesskey + "\n")
    (conf_dir / "credentials" / "backend-api-key").write_text("")  # empty: not used
    config = conf_dir / "agentd.toml"
    text = write(tmp_path, sim, sim.accesskey).read_text()
    config.write_text(text.replace(f'accesskey_file = "{tmp_path / "accesskey"}"\n', ""))
    code, lines = await check(config)
    assert code == 0, lines
    assert lines[2].startswith("voipbin: ok, customer ")
    assert len(lines) == 4


async def test_an_api_url_without_its_version_is_named(sim: Simulator, tmp_path: Path) -> None:
    config = write(tmp_path, sim, sim.accesskey)
    config.write_text(config.read_text().replace(sim.api_url, sim.base_url))  # no /v1.0
    code, lines = await check(config)
    assert code == 1, lines
    assert "voipbin: GET /customer answered 404: check voipbin.api_url (it ends in /v1.0)" in lines


async def test_a_voice_of_another_provider_is_a_warning(sim: Simulator, tmp_path: Path) -> None:
    config = write(tmp_path, sim, sim.accesskey)
    text = config.read_text().replace(
        "[agent]\n", '[agent]\ntts_provider = "aws"\nvoice_id = "21m00Tcm4TlvDq8ikWAM"\n'
    )
    config.write_text(text)
    code, lines = await check(config)
    assert code == 0, lines
    assert lines[1].startswith("config: warning: agent.voice_id: '21m00Tcm4TlvDq8ikWAM' looks")


async def test_an_openai_backend_is_asked_one_tiny_question(sim: Simulator, tmp_path: Path) -> None:
    apikey = tmp_path / "backend-key"
    apikey.write_text("sk-secret-backend-key\n")
    async with OpenAIStub(Script("Pong, I am here.", first_token_s=0.05, tokens_per_s=5)) as stub:
        backend = (
            f'kind = "openai"\nbase_url = "{stub.base_url}"\nmodel = "gpt-4o-mini"\n'
            f'api_key_file = "{apikey}"\ntimeout_s = 5'
        )
        code, lines = await check(write(tmp_path, sim, sim.accesskey, backend))
        assert code == 0, lines
        assert len(stub.requests) == 1
        request = stub.requests[0]
        assert request.messages == [{"role": "user", "content": "ping"}]
        assert request.headers["Authorization"] == "Bearer sk-secret-backend-key"
        # only the first chunk was read: the stream was closed before its end
        await asyncio.wait_for(stub.streams[0].done.wait(), 5)
        assert stub.streams[0].closed_early.is_set()
        assert stub.streams[0].sent < stub.streams[0].planned
    last = lines[-1]
    assert last.startswith(f"backend: ok (openai gpt-4o-mini at {stub.base_url}, first token in ")
    assert last.endswith(" ms)")
    assert int(last.rsplit(" ", 2)[-2]) >= 50
    assert "sk-secret" not in "\n".join(lines)


async def test_an_unreachable_backend_fails(sim: Simulator, tmp_path: Path) -> None:
    port = closed_port()
    backend = f'kind = "openai"\nbase_url = "http://127.0.0.1:{port}/v1"\ntimeout_s = 5'
    code, lines = await check(write(tmp_path, sim, sim.accesskey, backend))
    assert code == 1, lines
    assert lines[2].startswith("voipbin: ok")
    assert lines[3].startswith("backend: FAILED: openai backend: ")
    assert f"127.0.0.1:{port}" in lines[3]


async def test_a_backend_error_or_silence_fails(sim: Simulator, tmp_path: Path) -> None:
    async with OpenAIStub() as stub:
        stub.script(Script(status=401, error_message="Incorrect API key provided"))
        stub.script(Script("too late", first_token_s=5.0))
        backend = f'kind = "openai"\nbase_url = "{stub.base_url}"\ntimeout_s = 0.3'
        config = write(tmp_path, sim, sim.accesskey, backend)
        code, lines = await check(config)
        assert code == 1, lines
        assert lines[-1].startswith("backend: FAILED: openai backend: HTTP 401")
        assert "Incorrect API key provided" in lines[-1]
        code, lines = await check(config)
        assert code == 1, lines
        assert lines[-1] == "backend: FAILED: openai gpt-4o-mini at " + (
            f"{stub.base_url}: no answer within 0.3 s"
        )


async def test_an_http_backend_answers(sim: Simulator, tmp_path: Path) -> None:
    async with HttpStub() as stub:
        backend = f'kind = "http"\nurl = "{stub.reply_url}"'
        code, lines = await check(write(tmp_path, sim, sim.accesskey, backend))
        assert code == 0, lines
        assert stub.requests[0].body["text"] == "ping"
    assert lines[-1].startswith(f"backend: ok (http {stub.reply_url}, first chunk in ")


async def test_a_python_backend_is_imported_not_called(sim: Simulator, tmp_path: Path) -> None:
    backend = 'kind = "python"\ncallable = "tests.stubs:py_whole"'
    code, lines = await check(write(tmp_path, sim, sim.accesskey, backend))
    assert code == 0, lines
    assert lines[-1] == "backend: ok (python tests.stubs:py_whole, imported)"
    backend = 'kind = "python"\ncallable = "nope_pkg.mod:fn"'
    code, lines = await check(write(tmp_path, sim, sim.accesskey, backend))
    assert code == 2
    # one line, the error: no "config: ok" before it
    assert len(lines) == 1, lines
    assert lines[0].startswith("agentd: config error: backend.callable: cannot import 'nope_pkg")


async def test_retries_are_said_on_the_voipbin_line_not_logged_among_the_checks(
    sim: Simulator, tmp_path: Path
) -> None:
    # one line per check: a `voipbin.retry` warning for each attempt, on a terminal where
    # stderr and stdout mix, broke the checks up
    sim.faults.fail("GET", r"/customer$", 503, count=2)  # retried twice, then answered
    code, out, err = await run_cli(
        "check-config", "--config", str(write(tmp_path, sim, sim.accesskey))
    )
    assert code == 0, out + err
    assert [line.split(":")[0] for line in out.splitlines()] == [
        "config",
        "store",
        "voipbin",
        "backend",
    ]
    assert out.splitlines()[2].endswith(f"at {sim.api_url} (after 2 retries: HTTP 503 x2)")
    assert err == ""
    assert sim.accesskey not in out


async def test_a_config_mistake_is_exit_2(sim: Simulator, tmp_path: Path) -> None:
    config = write(tmp_path, sim, sim.accesskey)
    config.write_text(config.read_text() + '[metrics]\nlisten = "0.0.0.0:9464"\n')
    code, lines = await check(config)
    assert code == 2
    assert lines == [
        "agentd: config error: metrics.listen: '0.0.0.0' is not a loopback address; agentd "
        "listens on nothing but 127.0.0.1 or ::1 (scrape through a local Prometheus or an SSH "
        "tunnel)"
    ]


async def test_a_key_in_the_api_url_is_refused_not_printed(sim: Simulator, tmp_path: Path) -> None:
    # it was sent, and printed whole in the `voipbin: FAILED ... (GET <url>/customer)` line
    secret = "vb_inthequery0123456789"
    config = write(tmp_path, sim, sim.accesskey)
    config.write_text(
        config.read_text().replace(
            f'api_url = "{sim.api_url}"', f'api_url = "{sim.api_url}?accesskey={secret}"'
        )
    )
    code, lines = await check(config)
    assert code == 2, lines
    assert lines == [
        "agentd: config error: voipbin.api_url: must not carry a query string (?...) or "
        "fragment; put the access key in voipbin.accesskey (or accesskey_file), never in the URL"
    ]
    assert sim.requests == []  # nothing was sent


# ---- the store ----------------------------------------------------------------------------------


def test_the_services_store_is_no_failure_before_the_first_start(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # after `make install` the unit's StateDirectory (/var/lib/agentd) does not exist until
    # systemd starts the service; check-config must not fail on it (it did: exit 1)
    service_store = tmp_path / "state" / "agentd.db"
    monkeypatch.setattr(stores, "SERVICE_STORE", str(service_store))
    ok, line = stores._check_sqlite("sqlite s", str(service_store))
    assert (ok, line) == (True, "sqlite s, created at the first start (the unit's StateDirectory=)")
    other = tmp_path / "elsewhere" / "agentd.db"
    ok, line = stores._check_sqlite("sqlite o", str(other))
    assert (ok, line) == (False, f"sqlite o: the directory {other.parent} does not exist")


async def test_the_sqlite_store_is_named_with_its_schema(sim: Simulator, tmp_path: Path) -> None:
    from agentd.store import LATEST_VERSION, Store

    db = tmp_path / "agentd.db"
    store = await Store.open(str(db))
    await store.close()
    code, lines = await check(write(tmp_path, sim, sim.accesskey))
    assert code == 0, lines
    assert lines[1] == f"store: ok (sqlite {db}, schema version {LATEST_VERSION})"
    code, lines = await check(write(tmp_path, sim, sim.accesskey, store='path = "/no/such/a.db"'))
    assert code == 1, lines
    assert lines[1] == "store: FAILED: sqlite /no/such/a.db: the directory /no/such does not exist"
    assert lines[-1] == "backend: ok (echo, nothing to check)"  # the other checks still ran
    code, lines = await check(write(tmp_path, sim, sim.accesskey, store='path = ""'))
    assert code == 0, lines
    assert lines[1] == 'store: ok (off (store.path = ""): no restart recovery, no call history)'


async def test_a_postgresql_store_is_checked_without_its_password(
    sim: Simulator, tmp_path: Path, pg_server: PgServer
) -> None:
    from agentd.config import PgUrl
    from agentd.store_pg import LATEST_PG_VERSION, PgStore

    name = pg_server.create_database(owner=pg_server.pw_user)
    try:
        url = pg_server.url(name, pg_server.pw_user, pg_server.pw_password)
        dsn = PgUrl.parse(url).dsn
        config = write(tmp_path, sim, sim.accesskey, store=f'url = "{url}"')
        code, lines = await check(config)
        assert code == 0, lines
        assert lines[1] == (
            f"store: ok (postgresql {dsn}, empty: agentd creates its tables at the first start)"
        )
        store = await PgStore.open(url)
        await store.close()
        code, lines = await check(config)
        assert code == 0, lines
        assert lines[1] == f"store: ok (postgresql {dsn}, schema version {LATEST_PG_VERSION})"
        wrong = url.replace(pg_server.pw_password, "Not-The-Password-42")
        code, lines = await check(write(tmp_path, sim, sim.accesskey, store=f'url = "{wrong}"'))
        assert code == 1, lines
        assert lines[1].startswith(f"store: FAILED: PostgreSQL {dsn}: cannot connect: ")
        assert "password authentication failed" in lines[1]
        assert lines[-1] == "backend: ok (echo, nothing to check)"
        text = "\n".join(lines)
        assert pg_server.pw_password not in text and "Not-The-Password" not in text
    finally:
        pg_server.drop_database(name)
