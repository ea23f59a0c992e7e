"""Configuration: one TOML file, `AGENTD_<SECTION>_<KEY>` environment overrides, secrets from files.

Everything is validated at load time and a mistake is reported as one line naming the key
(`ConfigError`), never as a traceback at first use. Secrets may come from the file, a `*_file` key,
the environment, or a systemd credential (`$CREDENTIALS_DIRECTORY/voipbin-accesskey`, ...); they are
wrapped in `Secret` so they never print.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from agentd.call import DEFAULT_FALLBACK, DEFAULT_GREETING, CallSettings
from agentd.secret import Secret


class ConfigError(Exception):
    """A configuration mistake; the message names the key and is safe to print."""


# section -> key -> (type, default). `None` default = optional.
_SCHEMA: dict[str, dict[str, tuple[type | tuple[type, ...], Any]]] = {
    "voipbin": {
        "api_url": (str, "https://api.voipbin.net/v1.0"),
        "ws_url": (str, ""),
        "accesskey": (str, ""),
        "accesskey_file": (str, ""),
        "token": (str, ""),
        "token_file": (str, ""),
        "username": (str, ""),
        "password": (str, ""),
        "password_file": (str, ""),
        "rate_per_s": ((int, float), 17.0),
        "burst": (int, 33),
        "timeout_s": ((int, float), 10.0),
    },
    "agent": {
        "numbers": (list, []),
        "greeting": (str, DEFAULT_GREETING),
        "language": (str, "en-US"),
        "tts_provider": (str, "elevenlabs"),
        "voice_id": (str, "21m00Tcm4TlvDq8ikWAM"),
        "stt_provider": (str, "aws"),
        "system_prompt": (str, "You are a helpful voice agent on a phone call. Answer briefly."),
        "barge_in": (str, "speech"),
        "barge_in_min_words": (int, 2),
        "cut_method": (str, "auto"),
        "chars_per_s": ((int, float), 15.0),
        "fallback_text": (str, DEFAULT_FALLBACK),
        "history_limit": (int, 40),
        "silence_s": ((int, float), 20.0),
        "max_silence_reprompts": (int, 2),
        "reprompt_text": (str, "Are you still there?"),
        "max_call_s": ((int, float), 3300.0),
        "watch_s": ((int, float), 20.0),
        "flow_id": (str, ""),
        "caller_id": (str, ""),
    },
    "backend": {
        "kind": (str, "echo"),
        "timeout_s": ((int, float), 15.0),
        "prefix": (str, "You said:"),
        "base_url": (str, "https://api.openai.com/v1"),
        "model": (str, "gpt-4o-mini"),
        "api_key": (str, ""),
        "api_key_file": (str, ""),
        "temperature": ((int, float), 0.7),
        "max_tokens": (int, 300),
        "tools": (bool, True),
        "url": (str, ""),
        "callable": (str, ""),
    },
    "store": {"path": (str, "agentd.db")},
    "log": {"level": (str, "info"), "format": (str, "auto")},
    "daemon": {
        "drain_s": ((int, float), 10.0),
        "stop_sessions_on_shutdown": (bool, False),
        "shutdown_goodbye": (str, "Sorry, I have to end the call now. Goodbye!"),
    },
    # observability: `agentd status` socket (None = the default path, "" = off) and metrics
    "status": {"socket": (str, None)},
    "metrics": {"listen": (str, "")},
}
_CHOICES = {
    ("agent", "barge_in"): ("speech", "transcript", "off"),
    ("agent", "cut_method"): ("auto", "flush", "restart"),
    ("backend", "kind"): ("echo", "openai", "http", "python"),
    ("log", "level"): ("debug", "info", "warning", "error"),
    ("log", "format"): ("auto", "json", "console"),
}
# systemd credential name -> the key it fills
_CREDENTIALS = {
    "voipbin-accesskey": ("voipbin", "accesskey"),
    "voipbin-token": ("voipbin", "token"),
    "voipbin-password": ("voipbin", "password"),
    "backend-api-key": ("backend", "api_key"),
}


@dataclass(frozen=True)
class VoipbinConfig:
    """[voipbin]"""

    api_url: str
    ws_url: str
    accesskey: Secret | None
    token: Secret | None
    username: str
    password: Secret | None
    rate_per_s: float
    burst: int
    timeout_s: float


@dataclass(frozen=True)
class Config:
    """The whole configuration, validated."""

    voipbin: VoipbinConfig
    call: CallSettings
    numbers: tuple[str, ...]
    flow_id: str
    caller_id: str
    backend: dict[str, Any]
    store_path: str
    log_level: str
    log_format: str
    drain_s: float
    daemon: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    raw: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    status_socket: str = ""  # absolute path of the `agentd status` socket; "" = off
    metrics_listen: str = ""  # loopback "host:port" for Prometheus metrics; "" = off


def load(
    path: str | os.PathLike[str] | None,
    env: Mapping[str, str] | None = None,
    *,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """Read, merge and validate the configuration; raise `ConfigError` on any mistake."""
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except PermissionError:
            raise ConfigError(f"{path}: permission denied") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    merged = _validate(data)
    for section, values in (overrides or {}).items():
        merged.setdefault(section, {}).update(values)
    _apply_env(merged, env)
    return _build(merged, env, str(path or ""))


def _validate(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {s: {} for s in _SCHEMA}
    for section, values in data.items():
        if section not in _SCHEMA:
            raise ConfigError(f"{section}: unknown section (known: {', '.join(_SCHEMA)})")
        if not isinstance(values, dict):
            raise ConfigError(f"{section}: expected a table")
        for key, value in values.items():
            out[section][key] = _check(section, key, value)
    return out


def _check(section: str, key: str, value: Any) -> Any:
    spec = _SCHEMA[section].get(key)
    if spec is None:
        raise ConfigError(f"{section}.{key}: unknown key")
    typ = spec[0]
    if (isinstance(value, bool) and typ is not bool) or not isinstance(value, typ):
        names = " or ".join(t.__name__ for t in (typ if isinstance(typ, tuple) else (typ,)))
        raise ConfigError(f"{section}.{key}: expected {names}, got {type(value).__name__}")
    if isinstance(value, list) and not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{section}.{key}: expected a list of strings")
    choices = _CHOICES.get((section, key))
    if choices and value not in choices:
        raise ConfigError(f"{section}.{key}: {value!r} is not one of {', '.join(choices)}")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
        raise ConfigError(f"{section}.{key}: must not be negative")
    return value


def _apply_env(merged: dict[str, dict[str, Any]], env: Mapping[str, str]) -> None:
    for section, keys in _SCHEMA.items():
        for key, (typ, _) in keys.items():
            name = f"AGENTD_{section.upper()}_{key.upper()}"
            if name not in env:
                continue
            raw = env[name]
            value: Any = raw
            try:
                if typ is list:
                    value = [v.strip() for v in raw.split(",") if v.strip()]
                elif typ is bool:
                    if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                        raise ValueError(raw)
                    value = raw.lower() in ("1", "true", "yes")
                elif typ is int:
                    value = int(raw)
                elif typ == (int, float):
                    value = float(raw)
            except ValueError:
                raise ConfigError(f"{name}: expected a number") from None
            merged[section][key] = _check(section, key, value)


def _read_secret(label: str, path: str) -> Secret:
    try:
        value = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{label}: cannot read {path}: {exc.strerror or exc}") from None
    if not value:
        raise ConfigError(f"{label}: {path} is empty")
    return Secret(value)


def _secret(section: str, v: dict[str, Any], key: str, env: Mapping[str, str]) -> Secret | None:
    """A secret from the key itself, its `*_file`, or its systemd credential."""
    if v.get(key):
        return Secret(v[key])
    if v.get(f"{key}_file"):
        return _read_secret(f"{section}.{key}_file", v[f"{key}_file"])
    creds = env.get("CREDENTIALS_DIRECTORY")
    if creds:
        for name, target in _CREDENTIALS.items():
            path = Path(creds) / name
            # the unit loads every credential it knows; an empty file means "not used"
            if target == (section, key) and path.exists() and path.stat().st_size > 0:
                return _read_secret(f"credential {name}", str(path))
    return None


def default_ws_url(api_url: str) -> str:
    """wss://host/v1.0/ws for https://host/v1.0 (ws:// for http://)."""
    parts = urlsplit(api_url.rstrip("/"))
    scheme = "wss" if parts.scheme == "https" else "ws"
    return urlunsplit((scheme, parts.netloc, parts.path + "/ws", "", ""))


def _build(m: dict[str, dict[str, Any]], env: Mapping[str, str], source: str) -> Config:
    def get(section: str, key: str) -> Any:
        return m[section].get(key, _SCHEMA[section][key][1])

    v = {k: get("voipbin", k) for k in _SCHEMA["voipbin"]}
    api_url = v["api_url"].rstrip("/")
    if urlsplit(api_url).scheme not in ("http", "https") or not urlsplit(api_url).netloc:
        raise ConfigError(f"voipbin.api_url: not an http(s) URL: {api_url!r}")
    ws_url = v["ws_url"] or default_ws_url(api_url)
    if urlsplit(ws_url).scheme not in ("ws", "wss"):
        raise ConfigError(f"voipbin.ws_url: not a ws(s) URL: {ws_url!r}")
    accesskey = _secret("voipbin", v, "accesskey", env)
    token = _secret("voipbin", v, "token", env)
    password = _secret("voipbin", v, "password", env)
    if v["username"] and password is None:
        raise ConfigError("voipbin.password: username is set but no password or password_file")
    if not (accesskey or token or (v["username"] and password)):
        raise ConfigError(
            "voipbin: no credentials: set accesskey (or accesskey_file, AGENTD_VOIPBIN_ACCESSKEY, "
            "the systemd credential voipbin-accesskey), token, or username + password"
        )
    if accesskey and accesskey.reveal().count(".") == 2:
        raise ConfigError("voipbin.accesskey: this looks like a JWT; put it in voipbin.token")
    a = {k: get("agent", k) for k in _SCHEMA["agent"]}
    if a["chars_per_s"] <= 0:
        raise ConfigError("agent.chars_per_s: must be positive")
    call = CallSettings(
        greeting=a["greeting"],
        language=a["language"],
        tts_provider=a["tts_provider"],
        voice_id=a["voice_id"],
        stt_provider=a["stt_provider"],
        system_prompt=a["system_prompt"],
        barge_in=a["barge_in"],
        barge_in_min_words=a["barge_in_min_words"],
        cut_method=None if a["cut_method"] == "auto" else a["cut_method"],
        chars_per_s=float(a["chars_per_s"]),
        fallback_text=a["fallback_text"],
        history_limit=a["history_limit"],
        silence_s=float(a["silence_s"]),
        max_silence_reprompts=a["max_silence_reprompts"],
        reprompt_text=a["reprompt_text"],
        max_call_s=float(a["max_call_s"]),
        watch_s=float(a["watch_s"]),
    )
    return Config(
        voipbin=VoipbinConfig(
            api_url=api_url,
            ws_url=ws_url,
            accesskey=accesskey,
            token=token,
            username=v["username"],
            password=password,
            rate_per_s=float(v["rate_per_s"]),
            burst=int(v["burst"]),
            timeout_s=float(v["timeout_s"]),
        ),
        call=call,
        numbers=tuple(a["numbers"]),
        flow_id=a["flow_id"],
        caller_id=a["caller_id"] or (a["numbers"][0] if a["numbers"] else ""),
        backend=_backend(m, env),
        store_path=get("store", "path"),
        log_level=get("log", "level"),
        log_format=get("log", "format"),
        drain_s=float(get("daemon", "drain_s")),
        daemon={k: get("daemon", k) for k in _SCHEMA["daemon"]},
        source=source,
        raw=m,
        status_socket=resolve_status_socket(get("status", "socket"), env, get("store", "path")),
        metrics_listen=_metrics_listen(get("metrics", "listen")),
    )


def _backend(m: dict[str, dict[str, Any]], env: Mapping[str, str]) -> dict[str, Any]:
    b = {k: m["backend"].get(k, spec[1]) for k, spec in _SCHEMA["backend"].items()}
    b["api_key"] = _secret("backend", b, "api_key", env)
    del b["api_key_file"]
    kind = b["kind"]
    if kind == "http" and not b["url"]:
        raise ConfigError("backend.url: the http backend needs the URL of your service")
    if kind == "python" and ":" not in b["callable"]:
        raise ConfigError("backend.callable: expected 'module:function'")
    url_key = {"openai": "base_url", "http": "url"}.get(kind)
    if url_key and urlsplit(b[url_key]).scheme not in ("http", "https"):
        raise ConfigError(f"backend.{url_key}: not an http(s) URL")
    return b


# ---- observability: the status socket and the metrics address --------------------------------

SOCKET_NAME = "agentd.sock"
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path holds 108 bytes including the final NUL


def default_status_socket(env: Mapping[str, str], store_path: str) -> str:
    """Where the status socket goes when `[status] socket` is not set.

    Under systemd, `$RUNTIME_DIRECTORY/agentd.sock` (`RuntimeDirectory=agentd`: /run/agentd,
    removed when the service stops). Otherwise next to the store (`agentd.db` -> `agentd.sock`),
    so two agentd with their own stores never share a socket; without a store, `agentd.sock`
    in the current directory."""
    runtime = env.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime:
        return os.path.join(runtime, SOCKET_NAME)
    if store_path:
        return os.path.abspath(str(Path(store_path).with_suffix(".sock")))
    return os.path.abspath(SOCKET_NAME)


def resolve_status_socket(value: str | None, env: Mapping[str, str], store_path: str) -> str:
    """The status socket path: `value` made absolute, the default when unset, "" when off."""
    if value is None:
        return default_status_socket(env, store_path)
    if not value:
        return ""
    path = os.path.abspath(value)
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise ConfigError(f"status.socket: {path!r} is too long for a Unix socket (max 107 bytes)")
    return path


def parse_listen(value: str) -> tuple[str, int]:
    """`127.0.0.1:9464` or `[::1]:9464` -> (host, port); only loopback hosts are accepted.

    agentd opens no port on the network: metrics are for a local Prometheus (or an SSH tunnel).
    `localhost` means 127.0.0.1. Port 0 picks a free port (tests)."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(f"metrics.listen: expected host:port, e.g. 127.0.0.1:9464, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host == "localhost":
        host = "127.0.0.1"
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigError(
            f"metrics.listen: {host!r} is not a loopback address; agentd listens on nothing but "
            "127.0.0.1 or ::1 (scrape through a local Prometheus or an SSH tunnel)"
        )
    return host, int(port_text)


def _metrics_listen(value: str) -> str:
    if value:
        parse_listen(value)
    return value
