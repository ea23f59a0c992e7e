"""Checks on systemd/agentd.service: plain-text checks, then systemd-analyze itself.

The systemd-analyze checks run when ``systemd-analyze`` is on PATH (systemd 252 here) and
are skipped with a reason otherwise. They need no running systemd: ``security --offline``
and ``verify`` only read unit files.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from agentd.config import UNIT_TIMEOUT_STOP_S

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "agentd.service"
EXAMPLE_CONFIG = ROOT / "systemd" / "agentd.toml.example"
PYPROJECT = ROOT / "pyproject.toml"

MAX_EXPOSURE = 1.5  # systemd-analyze's 0.0-10.0 scale; the unit scored 1.1 on systemd 252
OFFLINE_SECURITY_MIN_VERSION = 250  # `systemd-analyze security --offline=` appeared in 250

Directives = dict[str, list[str]]


def parse_unit(text: str) -> dict[str, Directives]:
    """A small unit-file reader: {section: {key: [every assignment, in order]}}.

    Enough for our own unit: it rejects line continuations rather than half-supporting them.
    """
    sections: dict[str, Directives] = {}
    current: Directives | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"line {number}: continuation lines are not supported"
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"line {number}: assignment outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"line {number}: not an assignment: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture(scope="module")
def unit_text() -> str:
    return UNIT.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def unit(unit_text: str) -> dict[str, Directives]:
    return parse_unit(unit_text)


@pytest.fixture(scope="module")
def service(unit: dict[str, Directives]) -> Directives:
    return unit["Service"]


def only(directives: Directives, key: str) -> str:
    values = directives.get(key, [])
    assert len(values) == 1, f"{key}= should be set exactly once, got {values!r}"
    return values[0]


def environment(service: Directives) -> dict[str, str]:
    env: dict[str, str] = {}
    for assignment in service.get("Environment", []):
        for word in shlex.split(assignment):
            name, sep, value = word.partition("=")
            assert sep, f"Environment word without '=': {word!r}"
            env[name] = value
    return env


# ---------------------------------------------------------------------------- plain text


def test_notify_watchdog_and_reload(service: Directives) -> None:
    assert only(service, "Type") == "notify"
    assert only(service, "NotifyAccess") == "main"
    assert only(service, "WatchdogSec") == "30"
    # systemd 252 has no Type=notify-reload: reload is SIGHUP to the main process.
    assert only(service, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert only(service, "Restart") == "on-failure"
    # a bad config or a login without the permission exits 2: no restart loop
    assert only(service, "RestartPreventExitStatus") == "2"
    # what config.py warns a drain against (daemon.drain_s)
    assert only(service, "TimeoutStopSec") == f"{UNIT_TIMEOUT_STOP_S:g}"


def test_network_online_ordering(unit: dict[str, Directives]) -> None:
    assert "network-online.target" in only(unit["Unit"], "Wants").split()
    assert "network-online.target" in only(unit["Unit"], "After").split()
    assert only(unit["Install"], "WantedBy") == "multi-user.target"


def test_credentials_are_loaded_from_files(service: Directives) -> None:
    loaded = dict(value.split(":", 1) for value in service.get("LoadCredential", []))
    assert loaded == {
        "voipbin-accesskey": "/etc/agentd/credentials/voipbin-accesskey",
        "backend-api-key": "/etc/agentd/credentials/backend-api-key",
    }
    # the commands run by hand look for them by the same rule, beside the config ExecStart=
    # names (make install moves both with CONF_DIR)
    from agentd.cli import credentials_beside

    config = only(service, "ExecStart").split("--config ", 1)[1]
    assert {os.path.dirname(path) for path in loaded.values()} == {credentials_beside(config)}


SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL", re.IGNORECASE)
SECRET_VALUE = re.compile(
    r"\bvb_[A-Za-z0-9]{8,}"  # a VoIPBIN access key
    r"|\bsk-[A-Za-z0-9_-]{16,}"  # an OpenAI-style API key
    r"|\beyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}"  # a JWT
)


def test_no_secret_values_in_the_unit(unit_text: str, service: Directives) -> None:
    # Secrets come only by LoadCredential= from root-only files: never inline.
    for inline in ("SetCredential", "SetCredentialEncrypted", "LoadCredentialEncrypted"):
        assert inline not in service
    assert "EnvironmentFile" not in service
    for name in environment(service):
        assert not SECRET_NAME.search(name), f"secret-looking variable in Environment=: {name}"
    assert not SECRET_VALUE.findall(unit_text)


def test_environment(service: Directives) -> None:
    assert environment(service) == {
        "PYTHONUNBUFFERED": "1",
        "PYTHONFAULTHANDLER": "1",
        "AGENTD_LOG_FORMAT": "json",
    }
    assert only(service, "SyslogIdentifier") == "agentd"


def test_execstart_runs_the_agentd_console_script(service: Directives) -> None:
    argv = shlex.split(only(service, "ExecStart"))
    scripts = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]["scripts"]
    assert Path(argv[0]).name == "agentd"
    assert Path(argv[0]).name in scripts, f"no console script {Path(argv[0]).name!r}: {scripts}"
    assert argv == ["/opt/agentd/venv/bin/agentd", "run", "--config", "/etc/agentd/agentd.toml"]


def service_env(service: Directives) -> dict[str, str]:
    """The environment the unit gives agentd: its Environment= and what StateDirectory= and
    LoadCredential= add (the credential directory as the test makes it)."""
    state_dir = Path("/var/lib") / only(service, "StateDirectory")
    return {**environment(service), "STATE_DIRECTORY": str(state_dir)}


def test_store_lives_in_the_state_directory(service: Directives, tmp_path: Path) -> None:
    # DynamicUser= can only write to StateDirectory= (ProtectSystem=strict), so the store path
    # the service ends up with, from the example config or by default, is inside it
    from agentd.config import load

    env = {**service_env(service), "AGENTD_VOIPBIN_ACCESSKEY": "vb_example_key"}
    state_dir = Path(env["STATE_DIRECTORY"])
    assert Path(load(EXAMPLE_CONFIG, env=env).store_path).parent == state_dir
    bare = tmp_path / "bare.toml"
    bare.write_text('[agent]\nnumbers = ["*"]\n')
    assert load(bare, env=env).store_path == str(state_dir / "agentd.db")


def test_a_config_that_keeps_nothing_keeps_nothing_under_the_unit(
    service: Directives, tmp_path: Path
) -> None:
    # the unit forced AGENTD_STORE_PATH, which overrode `path = ""` (README: personal data):
    # transcripts were kept while `check-config` run by hand said the store was off
    from agentd.config import load

    config = tmp_path / "agentd.toml"
    config.write_text('[agent]\nnumbers = ["*"]\n[store]\npath = ""\n')
    env = {**service_env(service), "AGENTD_VOIPBIN_ACCESSKEY": "vb_example_key"}
    assert load(config, env=env).store_path == ""
    assert load(config, env={"AGENTD_VOIPBIN_ACCESSKEY": "vb_example_key"}).store_path == ""
    # and any other path the config names is the one used
    config.write_text('[agent]\nnumbers = ["*"]\n[store]\npath = "/var/lib/agentd/other.db"\n')
    assert load(config, env=env).store_path == "/var/lib/agentd/other.db"


def test_example_config(service: Directives) -> None:
    text = EXAMPLE_CONFIG.read_text(encoding="utf-8")
    config = tomllib.loads(text)
    assert set(config) == {"voipbin", "agent", "backend", "store", "log"}
    assert config["log"]["format"] in {"auto", "json", "console"}
    # The file the comments tell a sysadmin to write is the one the unit loads as a credential;
    # pointing accesskey_file at it would fail under DynamicUser (root-only file).
    credential_path = dict(v.split(":", 1) for v in service["LoadCredential"])["voipbin-accesskey"]
    assert credential_path in text
    assert f'accesskey_file = "{credential_path}"' not in text
    assert not SECRET_VALUE.findall(text)
    # and it is a valid config as it stands, once the key arrives
    from agentd.config import load

    load(EXAMPLE_CONFIG, env={"AGENTD_VOIPBIN_ACCESSKEY": "vb_example_key"})


def test_example_config_settings_left_commented_out_are_valid_once_uncommented() -> None:
    # a sysadmin enables one by deleting its "# ": two keys on one line
    # (`username = "..."   password_file = "..."`) made the whole file invalid TOML
    from agentd.config import _SCHEMA

    section = ""
    commented = 0
    for number, line in enumerate(EXAMPLE_CONFIG.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        setting = re.match(r"# ?([a-z_]+ = .*)", line)
        if not setting or not section:
            continue
        try:
            parsed = tomllib.loads(setting.group(1))
        except tomllib.TOMLDecodeError as exc:
            raise AssertionError(f"line {number}, uncommented, is not TOML: {exc}") from None
        assert set(parsed) <= set(_SCHEMA[section]), f"line {number}: not a [{section}] key"
        commented += 1
    assert commented >= 4  # the credentials' alternatives and outbound_greeting


def _denied_networks(service: Directives) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [
        ipaddress.ip_network(word)
        for value in service.get("IPAddressDeny", [])
        for word in value.split()
    ]


@pytest.mark.parametrize(
    "address",
    [
        "169.254.169.254",  # cloud metadata
        "fe80::1",
        "224.0.0.251",  # mDNS
        "ff02::1",
        "10.1.2.3",
        "172.16.0.1",
        "172.31.255.254",
        "192.168.1.1",
        "100.64.0.1",
        "fd00::1",
    ],
)
def test_ip_deny_blocks_link_local_multicast_and_private(service: Directives, address: str) -> None:
    ip = ipaddress.ip_address(address)
    assert any(ip in net for net in _denied_networks(service)), f"{address} is not denied"


@pytest.mark.parametrize(
    "address", ["127.0.0.1", "127.0.0.53", "::1", "1.1.1.1", "2606:4700:4700::1111"]
)
def test_ip_deny_keeps_loopback_and_internet(service: Directives, address: str) -> None:
    ip = ipaddress.ip_address(address)
    assert not any(ip in net for net in _denied_networks(service)), f"{address} is denied"
    assert "IPAddressAllow" not in service  # nothing to re-allow: the deny list is targeted


# -------------------------------------------------------------------------- systemd-analyze

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze is not on PATH (install systemd >= 250 to check the unit)",
)


def _analyze(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    env = {
        **os.environ,
        "SYSTEMD_COLORS": "0",
        "SYSTEMD_PAGER": "",
        "SYSTEMD_LOG_COLOR": "0",
        "SYSTEMD_LOG_LOCATION": "0",
    }
    return subprocess.run(
        [SYSTEMD_ANALYZE, "--no-pager", *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        env=env,
        cwd=cwd,
        timeout=120,
        check=False,
    )


def _systemd_version() -> int:
    out = _analyze("--version").stdout
    match = re.match(r"systemd (\d+)", out)
    assert match, f"unexpected systemd-analyze --version output: {out!r}"
    return int(match.group(1))


@needs_systemd_analyze
def test_security_exposure_score() -> None:
    version = _systemd_version()
    if version < OFFLINE_SECURITY_MIN_VERSION:
        pytest.skip(f"systemd {version} has no `security --offline`")
    result = _analyze("security", "--offline=true", str(UNIT))
    report = result.stdout + result.stderr
    match = re.search(r"Overall exposure level for agentd\.service: (\d+\.\d+)", report)
    assert match, f"no overall exposure level in:\n{report}"
    score = float(match.group(1))
    assert score <= MAX_EXPOSURE, f"exposure {score} > {MAX_EXPOSURE}:\n{report}"
    assert result.returncode == 0, report


@needs_systemd_analyze
def test_verify_complains_only_about_the_missing_install_path() -> None:
    # The unit as shipped names /opt/agentd/venv/bin/agentd, which exists only on a host where
    # the install step ran. Pin down that this is verify's ONLY complaint, so the clean run
    # on a copy below hides nothing else.
    result = _analyze("verify", str(UNIT))
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    if Path("/opt/agentd/venv/bin/agentd").exists():
        assert result.returncode == 0
        assert lines == []
    else:
        assert result.returncode != 0
        assert lines == [
            "agentd.service: Command /opt/agentd/venv/bin/agentd is not executable: "
            "No such file or directory"
        ]


@needs_systemd_analyze
def test_verify_is_clean(tmp_path: Path) -> None:
    # `systemd-analyze verify` checks that every Exec*= binary exists. On 252 --root= does not
    # help: it also moves the unit search path, and then sysinit.target and the rest cannot be
    # found. So we verify a copy named agentd.service in tmp_path. In that copy only the
    # ExecStart= executable is changed, to a stand-in called agentd that exists; the arguments
    # and every other line stay byte-identical. ExecReload=/bin/kill is checked as it is.
    stand_in = tmp_path / "bin" / "agentd"
    stand_in.parent.mkdir()
    stand_in.write_text("#!/bin/sh\nexit 0\n", encoding="utf-8")
    stand_in.chmod(0o755)
    assert re.fullmatch(r"[A-Za-z0-9_./-]+", str(stand_in)), f"unsafe path for a unit: {stand_in}"

    original = UNIT.read_text(encoding="utf-8")
    old_exec = "ExecStart=/opt/agentd/venv/bin/agentd "
    assert original.count(old_exec) == 1
    copy_text = original.replace(old_exec, f"ExecStart={stand_in} ")
    changed = [
        (a, b) for a, b in zip(original.splitlines(), copy_text.splitlines(), strict=True) if a != b
    ]
    assert changed == [
        (
            "ExecStart=/opt/agentd/venv/bin/agentd run --config /etc/agentd/agentd.toml",
            f"ExecStart={stand_in} run --config /etc/agentd/agentd.toml",
        )
    ]
    copy = tmp_path / "agentd.service"
    copy.write_text(copy_text, encoding="utf-8")

    result = _analyze("verify", str(copy), cwd=tmp_path)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, output
    assert output == "", f"systemd-analyze verify is not clean:\n{output}"


# ---- make install's interpreter -------------------------------------------------------------


def _make(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "MAKE"))}
    return subprocess.run(
        ["make", "-s", "-C", str(ROOT), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_install_refuses_an_interpreter_the_unit_hides(
    service: Directives, tmp_path: Path
) -> None:
    # a pyenv build in /root/.pyenv gives a venv whose python and stdlib stay there: under
    # ProtectHome=yes the service could not even start (status 203/EXEC)
    assert only(service, "ProtectHome") == "yes"
    hidden = Path(os.path.realpath(sys.base_prefix)).parent
    target = tmp_path / "opt"
    result = _make(
        "install",
        f"PYTHON={sys.executable}",
        f"HIDDEN_DIRS=/nowhere {hidden}",
        f"INSTALL_DIR={target}",
        f"CONF_DIR={tmp_path / 'etc'}",
        f"UNIT_DIR={tmp_path / 'units'}",
        f"BIN_DIR={tmp_path / 'bin'}",
        tmp_path=tmp_path,
    )
    assert result.returncode != 0
    assert "ProtectHome=yes" in result.stdout
    assert "PYTHON=/usr/bin/python3" in result.stdout
    assert not target.exists()  # nothing was installed
    assert not (tmp_path / "etc").exists()


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_the_venvs_use_the_system_interpreter_when_it_can_make_one(tmp_path: Path) -> None:
    show = "--eval=show-python: ; @echo $(PYTHON)"
    # this interpreter is 3.11+ and has ensurepip: taken as the system's
    chosen = _make(show, "show-python", f"SYSTEM_PYTHON={sys.executable}", tmp_path=tmp_path)
    assert chosen.stdout.strip() == sys.executable, chosen.stderr
    # none there (or too old, or no venv module): python3 on PATH
    fallback = _make(show, "show-python", "SYSTEM_PYTHON=/nonexistent/python3", tmp_path=tmp_path)
    assert fallback.stdout.strip() == "python3", fallback.stderr
    # a choice on the command line wins
    mine = _make(show, "show-python", "PYTHON=python3.12", tmp_path=tmp_path)
    assert mine.stdout.strip() == "python3.12", mine.stderr


def _install_unit(
    tmp_path: Path, install_dir: str, conf_dir: str
) -> subprocess.CompletedProcess[str]:
    return _make(
        "install-unit",
        f"PYTHON={sys.executable}",
        "HIDDEN_DIRS=/nowhere /home /root",
        f"INSTALL_DIR={install_dir}",
        f"CONF_DIR={conf_dir}",
        f"UNIT_DIR={tmp_path / 'units'}",
        tmp_path=tmp_path,
    )


@needs_systemd_analyze
@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_install_writes_the_unit_for_its_own_directories(tmp_path: Path) -> None:
    # `make install INSTALL_DIR=/srv/agentd` must not leave a unit starting /opt/agentd's
    # agentd (status=203/EXEC) or loading credentials from a /etc/agentd nobody filled
    install_dir, conf_dir = tmp_path / "srv" / "agentd", tmp_path / "srv" / "etc"
    stand_in = install_dir / "venv" / "bin" / "agentd"
    stand_in.parent.mkdir(parents=True)
    stand_in.write_text("#!/bin/sh\nexit 0\n", encoding="utf-8")
    stand_in.chmod(0o755)
    result = _install_unit(tmp_path, str(install_dir), str(conf_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    rendered = tmp_path / "units" / "agentd.service"
    assert oct(rendered.stat().st_mode & 0o777) == "0o644"
    text = rendered.read_text(encoding="utf-8")
    changed = [
        b
        for a, b in zip(
            UNIT.read_text(encoding="utf-8").splitlines(), text.splitlines(), strict=True
        )
        if a != b
    ]
    assert changed == [
        f"ExecStart={stand_in} run --config {conf_dir}/agentd.toml",
        f"LoadCredential=voipbin-accesskey:{conf_dir}/credentials/voipbin-accesskey",
        f"LoadCredential=backend-api-key:{conf_dir}/credentials/backend-api-key",
    ]
    verified = _analyze("verify", str(rendered), cwd=tmp_path)
    output = (verified.stdout + verified.stderr).strip()
    assert verified.returncode == 0 and output == "", output


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize(
    ("install_dir", "conf_dir", "said"),
    [
        ("/home/me/agentd", "/etc/agentd", "ProtectHome=yes"),
        ("/opt/agentd", "/root/agentd-etc", "ProtectHome=yes"),
        ("agentd", "/etc/agentd", "not an absolute path"),
    ],
)
def test_make_install_refuses_directories_the_unit_cannot_use(
    tmp_path: Path, install_dir: str, conf_dir: str, said: str
) -> None:
    result = _install_unit(tmp_path, install_dir, conf_dir)
    assert result.returncode != 0
    assert said in result.stdout
    assert not (tmp_path / "units").exists()
