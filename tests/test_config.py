"""Configuration: defaults, environment overrides, secret files, and one clear line per mistake."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agentd.config import ConfigError, load

GOOD = """
[voipbin]
api_url = "https://api.voipbin.net/v1.0"
accesskey = "vb_testkey123"
[agent]
numbers = ["+15551234567"]
greeting = "Hi!"
[backend]
kind = "echo"
[store]
path = "agentd.db"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agentd.toml"
    path.write_text(text)
    return path


def test_good_config(tmp_path: Path) -> None:
    config = load(write(tmp_path, GOOD), env={})
    assert config.voipbin.ws_url == "wss://api.voipbin.net/v1.0/ws"
    assert config.voipbin.accesskey is not None
    assert config.voipbin.accesskey.reveal() == "vb_testkey123"
    assert "vb_testkey123" not in repr(config)
    assert config.call.greeting == "Hi!"
    assert config.call.stt_provider == "aws"
    assert config.call.cut == "restart"  # elevenlabs: flush does not cut the audio
    assert config.caller_id == "+15551234567"


def test_environment_overrides_every_key(tmp_path: Path) -> None:
    env = {
        "AGENTD_AGENT_GREETING": "Howdy",
        "AGENTD_AGENT_NUMBERS": "+1, +2",
        "AGENTD_VOIPBIN_RATE_PER_S": "5",
        "AGENTD_VOIPBIN_ACCESSKEY": "vb_fromenv",
    }
    config = load(write(tmp_path, GOOD), env=env)
    assert config.call.greeting == "Howdy"
    assert config.numbers == ("+1", "+2")
    assert config.voipbin.rate_per_s == 5.0
    assert config.voipbin.accesskey is not None
    assert config.voipbin.accesskey.reveal() == "vb_fromenv"


def test_secrets_from_files_and_systemd_credentials(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("vb_fromfile\n")
    text = GOOD.replace('accesskey = "vb_testkey123"', f'accesskey_file = "{key}"')
    config = load(write(tmp_path, text), env={})
    assert config.voipbin.accesskey is not None
    assert config.voipbin.accesskey.reveal() == "vb_fromfile"
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "voipbin-accesskey").write_text("vb_fromcred")
    (creds / "voipbin-password").write_text("")  # the unit loads it empty when unused
    text = GOOD.replace('accesskey = "vb_testkey123"', "")
    config = load(write(tmp_path, text), env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert config.voipbin.accesskey is not None
    assert config.voipbin.accesskey.reveal() == "vb_fromcred"
    assert config.voipbin.password is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("[agent]", "[agent]\ncolour = 1"), "agent.colour: unknown key"),
        (("[store]", "[nonsense]\n[store]"), "nonsense: unknown section"),
        (('greeting = "Hi!"', "greeting = 5"), "agent.greeting: expected str, got int"),
        (('numbers = ["+15551234567"]', "numbers = [1]"), "agent.numbers: expected a list of"),
        (('kind = "echo"', 'kind = "gpt"'), "backend.kind: 'gpt' is not one of echo"),
        (('accesskey = "vb_testkey123"', ""), "voipbin: no credentials"),
        (
            ('accesskey = "vb_testkey123"', 'accesskey_file = "/nonexistent/key"'),
            "voipbin.accesskey_file: cannot read /nonexistent/key",
        ),
        (
            ('api_url = "https://api.voipbin.net/v1.0"', 'api_url = "ftp://x"'),
            "voipbin.api_url: not an http(s) URL",
        ),
        (("[voipbin]", "[voipbin]\nburst = -1"), "voipbin.burst: must not be negative"),
        (("[agent]", "[agent"), "not valid TOML"),
    ],
)
def test_mistakes_name_the_key(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        load(write(tmp_path, GOOD.replace(*change)), env={})
    assert message in str(info.value)


def test_bad_environment_value_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="AGENTD_VOIPBIN_BURST: expected a number"):
        load(write(tmp_path, GOOD), env={"AGENTD_VOIPBIN_BURST": "lots"})


def test_cli_reports_a_bad_config_in_one_line_with_exit_2(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace('greeting = "Hi!"', "greeting = 5"))
    proc = subprocess.run(
        [sys.executable, "-m", "agentd", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "agentd: config error: agent.greeting: expected str, got int"
    assert "Traceback" not in proc.stderr + proc.stdout


def test_cli_missing_config_file(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "agentd", "run", "--config", str(tmp_path / "nope.toml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "no such config file" in proc.stderr


def test_version() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "agentd", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0 and proc.stdout.startswith("agentd ")
