"""The command line's plumbing: `agentd sim` passes its own options through; `agentd run`
exits with the reason when VoIPBIN refuses what the credentials need."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import pytest

from tests.support import run_cli

if TYPE_CHECKING:
    from pathlib import Path

    from agentd.sim import Simulator


async def test_agentd_sim_accepts_its_options_and_serves() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agentd",
        "sim",
        "--port",
        "0",
        "--no-rate-limit",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(30):
            while not (line := (await proc.stdout.readline()).decode()).startswith("api url:"):
                assert line, "agentd sim exited before printing its URL"
            api = line.split()[-1]
            key = ""
            while not key:
                line = (await proc.stdout.readline()).decode()
                if line.startswith("access key:"):
                    key = line.split()[-1]
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{api}/customer", headers={"Cookie": f"accesskey={key}"}) as resp,
        ):
            assert resp.status == 200
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_agentd_sim_on_a_port_in_use_says_so_in_one_line(sim: Simulator) -> None:
    port = sim.base_url.rsplit(":", 1)[1]
    code, out, err = await run_cli("sim", "--port", port)
    assert code == 1 and out == ""
    assert err.startswith(f"agentd sim: cannot listen on 127.0.0.1:{port}") and "--port" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(Path("/etc/agentd/agentd.toml").exists(), reason="this machine has one")
async def test_run_without_a_config_file_says_where_it_looked() -> None:
    code, _, err = await run_cli("run")
    assert code == 2
    assert "no config file: /etc/agentd/agentd.toml does not exist" in err
    assert "--config" in err and "AGENTD_CONFIG" in err


async def test_run_exits_2_naming_the_permission_the_login_lacks(
    sim: Simulator, tmp_path: Path
) -> None:
    config = tmp_path / "agentd.toml"
    config.write_text(
        f'[voipbin]\napi_url = "{sim.api_url}"\naccesskey = "{sim.accesskey}"\n'
        f'[agent]\nnumbers = ["*"]\n[store]\npath = "{tmp_path / "agentd.db"}"\n'
        '[log]\nformat = "json"\n'
    )
    sim.faults.fail("GET", r"/customer$", 403)  # a login with only CustomerAgent rights
    code, out, err = await run_cli("run", "--config", str(config))
    assert code == 2  # a config problem: systemd's restart cannot fix it either
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith(
            "agentd: VoIPBIN refused: HTTP 403 PERMISSION_DENIED the login lacks the CustomerAdmin "
            "or CustomerManager permission"
        )
    )
    assert '"event":"stream.forbidden"' in out  # the journal says it too, as an error
    assert sim.accesskey not in out + err
    assert len(sim.requests_matching("GET", r"/customer$")) == 1  # no silent retries


def test_agentd_run_collects_garbage_cycles_less_often_and_never_walks_its_imports() -> None:
    # in a fresh interpreter: the tests' own process keeps CPython's defaults
    code = (
        "import gc; from agentd.cli import tune_gc; d = gc.get_threshold(); tune_gc(); "
        "print(d, gc.get_threshold(), gc.get_freeze_count() > 10_000)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split(") (") == ["(700, 10, 10", "7000, 3, 10) True\n"]


def test_a_shell_reads_the_service_credentials_beside_whichever_config_it_is_given(
    tmp_path: Path,
) -> None:
    from agentd import cli
    from agentd.config import load

    # make install CONF_DIR=...: the unit's LoadCredential= names $(CONF_DIR)/credentials
    conf_dir = tmp_path / "srv" / "agentd-etc"
    creds = conf_dir / "credentials"
    creds.mkdir(parents=True, mode=0o700)
    config = conf_dir / "agentd.toml"
    config.write_text('[agent]\nnumbers = ["*"]\n', encoding="utf-8")
    (creds / "voipbin-accesskey").write_text("vb_from_the_credential\n", encoding="utf-8")
    env: dict[str, str] = {}
    assert cli.service_credentials(str(config), env) == ""
    assert env == {"CREDENTIALS_DIRECTORY": str(creds)}
    key = load(str(config), env=env).voipbin.accesskey
    assert key is not None and key.reveal() == "vb_from_the_credential"
    # a config with no credentials directory beside it, or the service's own directory
    # already set: left alone
    other: dict[str, str] = {}
    assert cli.service_credentials(str(tmp_path / "mine.toml"), other) == ""
    assert other == {}
    under_systemd = {"CREDENTIALS_DIRECTORY": "/run/credentials/agentd.service"}
    cli.service_credentials(str(config), under_systemd)
    assert under_systemd == {"CREDENTIALS_DIRECTORY": "/run/credentials/agentd.service"}


def test_a_credentials_directory_others_may_write_to_is_not_read(tmp_path: Path) -> None:
    from agentd import cli

    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "voipbin-accesskey").write_text("vb_planted_by_someone\n", encoding="utf-8")
    creds.chmod(0o777)  # beside a config in /tmp: anyone could have put a key there
    env: dict[str, str] = {}
    why = cli.service_credentials(str(tmp_path / "agentd.toml"), env)
    assert env == {}
    assert why == (
        f"{creds} was not read: it is writable by others (mode 0777); make it root's and 0700 "
        f"as make install does (chown root: {creds} && chmod 0700 {creds})"
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every directory")
def test_a_credentials_directory_this_user_cannot_read_says_to_use_sudo(tmp_path: Path) -> None:
    from agentd import cli

    creds = tmp_path / "credentials"
    creds.mkdir(mode=0o700)
    creds.chmod(0o300)  # as /etc/agentd/credentials (root's, 0700) is to anyone else
    try:
        env: dict[str, str] = {}
        why = cli.service_credentials(str(tmp_path / "agentd.toml"), env)
    finally:
        creds.chmod(0o700)
    assert env == {}
    assert why == f"the service's credentials, {creds}, are readable by root only: use sudo"


async def test_a_config_without_credentials_says_why_the_ones_beside_it_were_not_read(
    tmp_path: Path,
) -> None:
    config = tmp_path / "agentd.toml"
    config.write_text('[agent]\nnumbers = ["*"]\n', encoding="utf-8")
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "voipbin-accesskey").write_text("vb_planted_by_someone\n", encoding="utf-8")
    creds.chmod(0o777)
    code, out, err = await run_cli("check-config", "--config", str(config))
    assert code == 2 and out == ""
    assert err.startswith("agentd: config error: voipbin: no credentials: set accesskey")
    assert err.rstrip().endswith(f"(chown root: {creds} && chmod 0700 {creds}))")
    assert len(err.splitlines()) == 1


def test_under_the_journal_the_reason_agentd_run_stops_is_logged_as_an_error(
    tmp_path: Path,
) -> None:
    # stderr goes to the journal at SyslogLevel= (info) unless a line says otherwise: the
    # config error that stopped the service was missing from `journalctl -p warning`
    config = tmp_path / "agentd.toml"
    config.write_text("[agent]\nnumbers = 5\n", encoding="utf-8")
    for journal in (True, False):
        stderr = tmp_path / f"stderr-{journal}"
        with stderr.open("wb") as fh:
            st = stderr.stat()
            # systemd names the journal's stream by device and inode; elsewhere it is inherited
            stream = f"{st.st_dev}:{st.st_ino}" if journal else "1:2"
            proc = subprocess.run(
                [sys.executable, "-m", "agentd", "run", "--config", str(config)],
                stdout=subprocess.DEVNULL,
                stderr=fh,
                env={**os.environ, "JOURNAL_STREAM": stream},
                timeout=60,
                check=False,
            )
        assert proc.returncode == 2
        prefix = "<3>" if journal else ""
        assert stderr.read_text() == (
            f"{prefix}agentd: config error: agent.numbers: expected list, got int\n"
        )


def test_every_option_of_every_command_says_what_it_does() -> None:
    # `agentd call --help` listed `--config CONFIG` with nothing after it, and `calls show` its
    # --json, --config and --store
    import argparse

    from agentd import cli

    def commands(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        found = [parser]
        for sub in subs:
            for child in sub.choices.values():
                found += commands(child)
        return found

    bare = [
        f"{command.prog} {' / '.join(action.option_strings)}"
        for command in commands(cli._parser())
        for action in command._actions
        if action.option_strings and not action.help
    ]
    assert bare == []


def test_a_bug_that_escapes_a_command_is_told_redacted_and_exits_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Python's own traceback would print the exception's message as it is: a URL with its key
    from agentd import cli, logs
    from agentd.secret import Secret

    key = Secret("vb_escaped_bug_key_1234")

    def broken(_: object) -> int:
        raise RuntimeError(f"GET https://api.example/v1.0/calls?accesskey={key.reveal()} failed")

    monkeypatch.setattr(cli, "_command", broken)
    # `main` points the process's logging at stderr for a tool: not for the tests after this one
    monkeypatch.setattr(logs, "configure", lambda *_, **__: None)
    assert cli.main(["status"]) == 1
    err = capsys.readouterr().err
    assert "agentd: internal error, please report it: RuntimeError(" in err
    assert "Traceback (most recent call last)" in err and "in broken" in err
    assert key.reveal() not in err
