"""Configuration: one TOML file, `AGENTD_<SECTION>_<KEY>` environment overrides, secrets from files.

Everything is validated at load time and a mistake is reported as one line naming the key
(`ConfigError`), never as a traceback at first use. Secrets may come from the file, a `*_file` key,
the environment, or a systemd credential (`$CREDENTIALS_DIRECTORY/voipbin-accesskey`, ...); they are
wrapped in `Secret` so they never print.

Each default is written once: the per-call keys of `[agent]` take theirs from `CallSettings`,
`[backend]` from `BackendConfig`, `[daemon]` from `DaemonConfig`, the REST budget from
agentd/ratelimit.py, the other keys from `_SCHEMA`.

Some keys have no safe default. `agent.numbers` must be set: an agent that silently took every
call of the account (the old meaning of an empty list) answers calls meant for people or for
another agent; `["*"]` says so on purpose. The providers are checked against what VoIPBIN
accepts, because it accepts anything and fails later, at the first `/say` (404) or silently.
"""

from __future__ import annotations

import difflib
import importlib.util
import ipaddress
import math
import os
import re
import sys
import tomllib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qsl, unquote, unquote_plus, urlencode, urlsplit, urlunsplit

from agentd.call import CallSettings
from agentd.language import canonical as canonical_language
from agentd.ratelimit import DEFAULT_BURST, DEFAULT_RATE_PER_S
from agentd.secret import Secret, display_url, learn_url


class ConfigError(Exception):
    """A configuration mistake; the message names the key and is safe to print."""


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
    # with the stream up, how often the newest page of calls is read for an answered call of
    # ours whose every event was lost (a subscription still taking effect, a client 2,000
    # messages behind): nothing else would find it. 0: only after each subscribe
    find_calls_s: float = 10.0


@dataclass(frozen=True)
class BackendConfig:
    """[backend]: where replies come from (README, Backends)."""

    kind: str = "echo"  # echo | openai | http | python
    timeout_s: float = 15.0
    prefix: str = "You said:"  # echo
    base_url: str = "https://api.openai.com/v1"  # openai
    model: str = "gpt-4o-mini"
    api_key: Secret | None = None  # openai, http
    temperature: float = 0.7
    max_tokens: int = 300
    tools: bool = True
    usage: bool = True  # openai: ask for the reply's token counts (`stream_options`)
    url: str = ""  # http
    callable: str = ""  # python: "module:function"

    def __repr__(self) -> str:
        # a key may be in a URL (`?code=` for Azure Functions, a user:password@)
        return _masked_repr(self, "base_url", "url")


# after daemon.drain_s, the most a stop spends hanging up the calls whose goodbye had not ended
SHUTDOWN_HANG_UP_S: Final = 5.0
UNIT_TIMEOUT_STOP_S: Final = 30.0  # systemd/agentd.service's TimeoutStopSec


@dataclass(frozen=True)
class DaemonConfig:
    """[daemon]: how agentd stops."""

    drain_s: float = 10.0  # on SIGTERM, how long in-flight replies (or the goodbyes) may take
    stop_sessions_on_shutdown: bool = False  # False: leave live calls for the next agentd
    shutdown_goodbye: str = "Sorry, I have to end the call now. Goodbye!"


@dataclass(frozen=True)
class OtelConfig:
    """[otel]: OpenTelemetry traces to the user's collector (the optional extra agentd[otel])."""

    enabled: bool = False
    endpoint: str = "http://127.0.0.1:4318"  # the collector's OTLP/HTTP receiver
    service_name: str = "agentd"
    include_text: bool = False  # put the caller's and the agent's words on spans

    def __repr__(self) -> str:
        return _masked_repr(self, "endpoint")  # a collector's URL may carry its key


def _masked_repr(obj: Any, *urls: str) -> str:
    """The dataclass's usual repr, the fields named in `urls` shown by `display_url`."""
    shown = []
    for f in fields(obj):
        value = getattr(obj, f.name)
        shown.append(f"{f.name}={display_url(value) if f.name in urls else value!r}")
    return f"{type(obj).__name__}({', '.join(shown)})"


PG_SCHEMES = ("postgresql", "postgres")


@dataclass(frozen=True)
class PgUrl:
    """`[store] url`: a PostgreSQL URL split into what may be printed and the password.

    `dsn` is the URL without its password (in the user part or a `password=` query parameter).
    The password is a `Secret`, handed to the driver as a separate argument, so no driver
    message quoting the DSN can carry it. The passphrase of the client's TLS key
    (`sslpassword=`) can reach asyncpg only in the DSN: it stays there, learnt as a secret, and
    `shown` (also `str()`) masks it: that form is for a log line, an error or `check-config`.
    """

    dsn: str
    password: Secret | None = None

    def __str__(self) -> str:
        return self.shown

    def __repr__(self) -> str:
        return f"PgUrl(dsn={self.shown!r}, password={self.password!r})"

    @property
    def shown(self) -> str:
        """The DSN fit to print: `dsn` with any `sslpassword` masked."""
        parts = urlsplit(self.dsn)
        query = parse_qsl(parts.query, keep_blank_values=True)
        if not any(k == _SSL_PASSWORD for k, _ in query):
            return self.dsn
        masked = [(k, "***" if k == _SSL_PASSWORD else v) for k, v in query]
        return urlunsplit(parts._replace(query=urlencode(masked, safe="*/")))

    @classmethod
    def parse(cls, text: str, password: Secret | None = None, *, key: str = "store.url") -> PgUrl:
        """Split `text`; `password` (from `password_file`, ...) if the URL carries none.

        Raises ConfigError naming `key`; the message never quotes the URL (it may hold a
        password)."""
        try:
            parts = urlsplit(text.strip())
            parts.port  # noqa: B018  (a bad port raises here, not at the first connect)
        except ValueError:
            raise ConfigError(f"{key}: not a valid URL (a bad port or host?)") from None
        if parts.scheme not in PG_SCHEMES:
            got = f"a {parts.scheme!r} URL" if parts.scheme else "no scheme"
            raise ConfigError(
                f"{key}: expected a postgresql:// (or postgres://) URL, got {got}, e.g. "
                '"postgresql://agentd@db.example:5432/agentd"'
            )
        userinfo, at, hostport = parts.netloc.rpartition("@")
        user, colon, in_url = userinfo.partition(":")
        query = parse_qsl(parts.query, keep_blank_values=True)
        in_query = [v for k, v in query if k == "password"]
        found = unquote(in_url) if colon and in_url else (in_query[-1] if in_query else "")
        if found and password is not None:
            raise ConfigError(f"{key}: the URL has a password and so has store.password(_file)")
        netloc = f"{user}@{hostport}" if at and user else hostport
        rest = urlencode([(k, v) for k, v in query if k != "password"]) if in_query else parts.query
        dsn = urlunsplit((parts.scheme, netloc, parts.path, rest, parts.fragment))
        # learnt, as written and decoded: redacted wherever the DSN is quoted whole
        for piece in f"{parts.query}&{urlsplit(dsn).query}".split("&"):
            k, _, v = piece.partition("=")
            if unquote(k) == _SSL_PASSWORD:
                Secret(v)
                Secret(unquote_plus(v))
        return cls(dsn, Secret(found) if found else password)


_SSL_PASSWORD = "sslpassword"


TypeSpec = type | tuple[type, ...]
NUMBER: TypeSpec = (int, float)  # an int in TOML is fine where a float is meant


def _owned_by(cls: type[Any], **types: TypeSpec) -> dict[str, tuple[TypeSpec, Any]]:
    """Schema entries for fields of the dataclass `cls`: the TOML type, and the field's default."""
    defaults = {f.name: f.default for f in fields(cls)}
    return {key: (typ, defaults[key]) for key, typ in types.items()}


# [agent] keys that are CallSettings fields (cut_method "auto" is CallSettings' None)
CALL_KEYS = _owned_by(
    CallSettings,
    greeting=str,
    outbound_greeting=str,
    language=str,
    tts_provider=str,
    voice_id=str,
    stt_provider=str,
    system_prompt=str,
    barge_in=str,
    barge_in_min_words=int,
    echo_guard_s=NUMBER,
    playback_pad_s=NUMBER,
    cut_method=str,
    chars_per_s=NUMBER,
    say_latency_s=NUMBER,
    transfer_numbers=(list, tuple),
    backchannels=(list, tuple),
    barge_in_greeting=bool,
    transfer_failed_text=str,
    max_speaking_restarts=int,
    final_hold_s=NUMBER,
    final_wait_s=NUMBER,
    reply_on=str,
    end_of_turn_s=NUMBER,
    end_of_turn_stop_s=NUMBER,
    speculate_s=NUMBER,
    max_speculative=int,
    filler_after_s=NUMBER,
    filler_text=str,
    max_turn_s=NUMBER,
    cut_in_text=str,
    barge_in_actions=bool,
    turn_marker=bool,
    fallback_text=str,
    history_limit=int,
    silence_s=NUMBER,
    max_silence_reprompts=int,
    reprompt_text=str,
    max_call_s=NUMBER,
    watch_s=NUMBER,
)
# section -> key -> (type, default). `None` default = optional.
_SCHEMA: dict[str, dict[str, tuple[TypeSpec, Any]]] = {
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
        "rate_per_s": (NUMBER, DEFAULT_RATE_PER_S),
        "burst": (int, DEFAULT_BURST),
        "timeout_s": (NUMBER, 10.0),
        "find_calls_s": (NUMBER, 10.0),
    },
    "agent": {
        "numbers": (list, []),
        **CALL_KEYS,
        "flow_id": (str, ""),
        "caller_id": (str, ""),
    },
    "backend": {
        **_owned_by(
            BackendConfig,
            kind=str,
            timeout_s=NUMBER,
            prefix=str,
            base_url=str,
            model=str,
            api_key=str,
            temperature=NUMBER,
            max_tokens=int,
            tools=bool,
            usage=bool,
            url=str,
            callable=str,
        ),
        "api_key_file": (str, ""),
    },
    # keep_days: ended calls (transcripts, history, events) are deleted after it; 0 = never
    # url: PostgreSQL (several replicas, one database) instead of the SQLite file at path;
    # lease_s: how long a replica's hold on a call outlives it (failover takes about that);
    # replica: the name `agentd status` shows for this replica (the host name by default)
    "store": {
        "path": (str, "agentd.db"),
        "keep_days": (NUMBER, 30.0),
        "url": (str, ""),
        "password": (str, ""),
        "password_file": (str, ""),
        "lease_s": (NUMBER, 3.0),
        "replica": (str, ""),
    },
    "log": {"level": (str, "info"), "format": (str, "auto")},
    "daemon": _owned_by(
        DaemonConfig, drain_s=NUMBER, stop_sessions_on_shutdown=bool, shutdown_goodbye=str
    ),
    # observability: `agentd status` socket (None = the default path, "" = off) and metrics
    "status": {"socket": (str, None)},
    "metrics": {"listen": (str, "")},
    "otel": _owned_by(OtelConfig, enabled=bool, endpoint=str, service_name=str, include_text=bool),
}
_CHOICES = {
    # STT: "" lets VoIPBIN choose (GCP, then AWS); TTS: what bin-tts-manager streams to
    # (anything else would silently go to ElevenLabs). The openapi enums say the same.
    ("agent", "stt_provider"): ("aws", "gcp", ""),
    ("agent", "tts_provider"): ("elevenlabs", "gcp", "aws"),
    ("agent", "barge_in"): ("speech", "transcript", "off"),
    ("agent", "reply_on"): ("final", "interim"),
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
    "store-password": ("store", "password"),
}


@dataclass(frozen=True)
class Config:
    """The whole configuration, validated."""

    voipbin: VoipbinConfig
    call: CallSettings
    numbers: tuple[str, ...]  # our numbers; () = every call of the account (`numbers = ["*"]`)
    flow_id: str
    caller_id: str
    backend: BackendConfig
    store_path: str  # the SQLite file; "" = no store, or PostgreSQL (`store_url`)
    log_level: str
    log_format: str
    daemon: DaemonConfig = DaemonConfig()
    source: str = ""
    status_socket: str = ""  # absolute path of the `agentd status` socket; "" = off
    metrics_listen: str = ""  # loopback "host:port" for Prometheus metrics; "" = off
    warnings: tuple[str, ...] = ()  # doubtful but valid settings, logged at start
    store_keep_days: float = 30.0  # ended calls older than this are pruned; 0 = kept for ever
    otel: OtelConfig = OtelConfig()
    store_url: PgUrl | None = None  # PostgreSQL instead of SQLite (`[store] url`)
    lease_s: float = 3.0  # a replica's lease on a call (PostgreSQL only)
    replica_name: str = ""  # this replica's name in `agentd status` ("" = the host name)


def load(
    path: str | os.PathLike[str] | None,
    env: Mapping[str, str] | None = None,
    *,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """Read, merge and validate the configuration; raise `ConfigError` on any mistake."""
    env = os.environ if env is None else env
    try:
        data = _read_toml(path) if path is not None else {}
        # overrides (the demo, tests) are checked like the file: a typo there must not pass
        merged = _validate(_merge(_validate(data), overrides or {}))
        # only a path in the config conflicts with a url (AGENTD_STORE_PATH may be a leftover
        # of an older unit, which set it)
        path_in_file = "path" in merged["store"]
        _apply_env(merged, env)
        if "path" not in merged["store"]:
            merged["store"]["path"] = default_store_path(env)
        return _build(merged, env, str(path or ""), store_path_in_file=path_in_file)
    except ConfigError as exc:
        message = _from_env(str(exc), env)
        # a misspelt variable is most often why a setting is missing: say so with the error
        # (a config that loads shows it among its warnings instead)
        unknown = _unknown_env(env)
        if not unknown and message == str(exc):
            raise
        raise ConfigError("; ".join((message, *unknown))) from None


def _from_env(message: str, env: Mapping[str, str]) -> str:
    """`message`, naming the variable when the key it is about was set by the environment: the
    file may not have the key at all, or a good value of it, and a unit's `Environment=` is
    the last place an operator looks."""
    section, _, key = message.partition(":")[0].partition(".")
    if key not in _SCHEMA.get(section, {}):
        return message
    name = f"AGENTD_{section.upper()}_{key.upper()}"
    return f"{message} (set by {name})" if name in env else message


STORE_NAME = "agentd.db"


def default_store_path(env: Mapping[str, str]) -> str:
    """The SQLite file when neither `[store] path` nor `$AGENTD_STORE_PATH` names one.

    Under systemd, `$STATE_DIRECTORY/agentd.db` (`StateDirectory=agentd`: /var/lib/agentd, the
    one place the service may write). The unit used to force the path with
    `Environment=AGENTD_STORE_PATH=...`, which overrode the config file, so `path = ""` ("keep
    nothing") was silently ignored under systemd; a default gives way to the file. Otherwise
    `agentd.db` in the current directory."""
    state = env.get("STATE_DIRECTORY", "").split(":")[0]
    return os.path.join(state, STORE_NAME) if state else STORE_NAME


def restart_needed(old: Config, new: Config) -> list[str]:
    """The keys whose change from `old` to `new` a reload (SIGHUP) does not apply.

    A reload applies what is read when a call starts or a reply is asked for: `[agent]`,
    `[backend]`, `[daemon]`. These are read once at start, by the REST client and the
    WebSocket, the log, the store, the listeners and the tracer, and keep their running values
    until a restart. Names only: a changed value may be a credential."""
    changed = [
        f"{section}.{f.name}"
        for section, cls, a, b in (
            ("voipbin", VoipbinConfig, old.voipbin, new.voipbin),
            ("otel", OtelConfig, old.otel, new.otel),
        )
        for f in fields(cls)
        if getattr(a, f.name) != getattr(b, f.name)
    ]
    pairs: dict[str, tuple[object, object]] = {
        "log.level": (old.log_level, new.log_level),
        "log.format": (old.log_format, new.log_format),
        "store.path": (old.store_path, new.store_path),
        "store.url": (old.store_url, new.store_url),  # its password included
        "store.keep_days": (old.store_keep_days, new.store_keep_days),
        "store.lease_s": (old.lease_s, new.lease_s),
        "store.replica": (old.replica_name, new.replica_name),
        "status.socket": (old.status_socket, new.status_socket),
        "metrics.listen": (old.metrics_listen, new.metrics_listen),
    }
    return changed + [key for key, (a, b) in pairs.items() if a != b]


def load_store_url(
    path: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None
) -> PgUrl | None:
    """Only the config's `[store] url` (None: SQLite), its password found as `agentd run` finds
    it: what `agentd calls` needs, which must not require the VoIPBIN credentials."""
    env = os.environ if env is None else env
    merged = _validate(_read_toml(path) if path is not None else {})
    path_in_file = "path" in merged["store"]
    try:
        _apply_env(merged, env)
        return _store_url(_section(merged, "store"), path_in_file, env)
    except ConfigError as exc:
        raise ConfigError(_from_env(str(exc), env)) from None


def _read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: a directory, not a config file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _merge(
    base: dict[str, dict[str, Any]], extra: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """`base` with each section of `extra` laid over it, key by key."""
    return {s: {**base.get(s, {}), **extra.get(s, {})} for s in {*base, *extra}}


def _validate(data: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
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
        names = ", ".join(c or '"" (VoIPBIN\'s default)' for c in choices)
        raise ConfigError(f"{section}.{key}: {value!r} is not one of {names}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        # TOML and float() read nan and inf: a nan compares false to every deadline, so a
        # timer armed with it never fires and one compared with it is never due
        if not math.isfinite(value):
            raise ConfigError(f"{section}.{key}: must be a finite number, got {value}")
        if value < 0:
            raise ConfigError(f"{section}.{key}: must not be negative")
        if value == 0 and (section, key) in _POSITIVE:
            why = _POSITIVE[section, key]
            raise ConfigError(f"{section}.{key}: must be more than 0 (0 would {why})")
    return value


# keys where 0 means nothing sensible, and what it would do: a timeout of 0 is none at all to
# aiohttp (a request that never answers hangs for ever), and every backend reply would fail at
# once. Elsewhere 0 turns a limit or a timer off, so a 0 here reads as "off" and is not.
_POSITIVE = {
    ("voipbin", "timeout_s"): "mean no limit",
    ("backend", "timeout_s"): "mean no limit",
    ("agent", "max_call_s"): "hang every call up at once, after its greeting",
    # its delay doubles from watch_s while the call stays quiet: from 0 it never grows
    ("agent", "watch_s"): "ask VoIPBIN about every call without a pause, all the time",
}


def _apply_env(merged: dict[str, dict[str, Any]], env: Mapping[str, str]) -> None:
    for section, keys in _SCHEMA.items():
        for key, (typ, _) in keys.items():
            name = f"AGENTD_{section.upper()}_{key.upper()}"
            if name not in env:
                continue
            raw = env[name]
            value: Any = raw
            try:
                if typ is list or (isinstance(typ, tuple) and list in typ):
                    value = [v.strip() for v in raw.split(",") if v.strip()]
                elif typ is bool:
                    if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                        raise ValueError(raw)
                    value = raw.lower() in ("1", "true", "yes")
                elif typ is int:
                    value = int(raw)
                elif typ == NUMBER:
                    value = float(raw)
            except ValueError:
                wanted = (
                    "true or false"
                    if typ is bool
                    else "a whole number"
                    if typ is int
                    else "a number"
                )
                raise ConfigError(f"{name}: expected {wanted}, got {raw!r}") from None
            merged[section][key] = _check(section, key, value)


# AGENTD_* names that are no setting: the config file's path, and the tests' OpenAPI spec
_OTHER_ENV = ("AGENTD_CONFIG", "AGENTD_OPENAPI")


def _env_names() -> list[str]:
    return [f"AGENTD_{s.upper()}_{k.upper()}" for s, keys in _SCHEMA.items() for k in keys]


def _unknown_env(env: Mapping[str, str]) -> tuple[str, ...]:
    """A warning for each AGENTD_* variable agentd does not read: a misspelt override
    (AGENTD_VOIPBIN_ACESSKEY) was ignored without a word. Names only, never values."""
    known = {*_env_names(), *_OTHER_ENV}
    out = []
    for name in sorted(n for n in env if n.startswith("AGENTD_") and n not in known):
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.8)
        hint = f" (did you mean {close[0]}?)" if close else ""
        out.append(f"{name}: not a setting agentd knows, ignored{hint}")
    return tuple(out)


def _read_secret(label: str, path: str, *, empty_is_unset: bool = False) -> Secret | None:
    try:
        # an editor on Windows (Notepad) starts a UTF-8 file with a BOM: not part of the key
        value = Path(path).read_text(encoding="utf-8").removeprefix("\ufeff").strip()
    except OSError as exc:
        raise ConfigError(f"{label}: cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{label}: {path} is not UTF-8 text") from None
    if not value:
        if empty_is_unset:
            return None
        raise ConfigError(f"{label}: {path} is empty")
    return Secret(value)


# secrets sent in an HTTP header (a cookie, `Authorization: Bearer`), which carries ASCII only
_HEADER_SECRETS = {("voipbin", "accesskey"), ("voipbin", "token"), ("backend", "api_key")}


def _secret(section: str, v: dict[str, Any], key: str, env: Mapping[str, str]) -> Secret | None:
    """A secret from the key itself, its `*_file`, or its systemd credential."""
    found, where = _find_secret(section, v, key, env)
    if found is not None and (section, key) in _HEADER_SECRETS and not found.reveal().isascii():
        # a stray character (a smart quote pasted with the key, a UTF-16 file) would fail every
        # request with a confusing error; the value itself is not shown
        raise ConfigError(
            f"{where}: has a character that is not ASCII (a pasted quote or a stray byte?); "
            "a key or token is plain ASCII"
        )
    return found


def _find_secret(
    section: str, v: dict[str, Any], key: str, env: Mapping[str, str]
) -> tuple[Secret | None, str]:
    """The secret and where it came from (for an error)."""
    if v.get(key):
        return Secret(v[key]), f"{section}.{key}"
    if v.get(f"{key}_file"):
        label = f"{section}.{key}_file"
        return _read_secret(label, v[f"{key}_file"]), label
    creds = env.get("CREDENTIALS_DIRECTORY")
    if creds:
        for name, target in _CREDENTIALS.items():
            path = Path(creds) / name
            # the unit loads every credential it knows; an empty file (or one holding only a
            # newline, as `echo > file` leaves it) means "not used"
            if target == (section, key) and path.exists():
                label = f"credential {name}"
                return _read_secret(label, str(path), empty_is_unset=True), label
    return None, ""


def _shadowed_secrets(m: dict[str, dict[str, Any]], env: Mapping[str, str]) -> tuple[str, ...]:
    """A warning for each secret given more than one way, naming the one used: the others
    were ignored without a word (a stale key in the file beating a rotated credential)."""
    out = []
    creds = env.get("CREDENTIALS_DIRECTORY")
    given: dict[str, list[str]] = {}
    for name, (section, key) in _CREDENTIALS.items():
        v = m.get(section, {})
        ways = given[f"{section}.{key}"] = [
            f"{section}.{k}" for k in (key, f"{key}_file") if v.get(k)
        ]
        if creds and _holds_something(Path(creds) / name):
            ways.append(f"the systemd credential {name}")
        if len(ways) > 1:
            out.append(f"{ways[0]} is used, {' and '.join(ways[1:])} ignored: keep one")
    if given["voipbin.token"] and given["voipbin.accesskey"]:
        out.append("voipbin: a token and an access key are both set: the token is used")
    return tuple(out)


def _holds_something(path: Path) -> bool:
    """A credential file that is there and not blank (the unit loads every one it knows)."""
    try:
        return bool(path.read_bytes().strip())
    except OSError:
        return False


def default_ws_url(api_url: str) -> str:
    """wss://host/v1.0/ws for https://host/v1.0 (ws:// for http://)."""
    parts = urlsplit(api_url.rstrip("/"))
    scheme = "wss" if parts.scheme == "https" else "ws"
    return urlunsplit((scheme, parts.netloc, parts.path + "/ws", "", ""))


def _build(
    m: dict[str, dict[str, Any]],
    env: Mapping[str, str],
    source: str,
    *,
    store_path_in_file: bool = False,
) -> Config:
    agent = _section(m, "agent")
    store = _section(m, "store")
    store_url = _store_url(store, store_path_in_file, env)
    store_path = "" if store_url else store["path"]
    log = _section(m, "log")
    call = _call_settings(agent)
    numbers = _numbers(agent["numbers"])
    return Config(
        voipbin=_voipbin(_section(m, "voipbin"), env),
        call=call,
        numbers=numbers,
        flow_id=_flow_id(agent["flow_id"]),
        caller_id=_caller_id(agent["caller_id"], numbers),
        backend=_backend(_section(m, "backend"), env),
        store_path=store_path,
        log_level=log["level"],
        log_format=log["format"],
        daemon=DaemonConfig(**_section(m, "daemon")),
        source=source,
        status_socket=resolve_status_socket(_section(m, "status")["socket"], env, store_path),
        metrics_listen=_metrics_listen(_section(m, "metrics")["listen"]),
        otel=_otel(_section(m, "otel")),
        warnings=_voice_warnings(call)
        + _drain_warnings(_section(m, "daemon")["drain_s"])
        + _unknown_env(env)
        + _shadowed_secrets(m, env),
        store_keep_days=store["keep_days"],
        store_url=store_url,
        lease_s=_lease_s(store["lease_s"]),
        replica_name=store["replica"],
    )


def _section(m: dict[str, dict[str, Any]], section: str) -> dict[str, Any]:
    """Every key of `section`: its value, or its default when unset; numbers as float."""
    out: dict[str, Any] = {}
    for key, (typ, default) in _SCHEMA[section].items():
        value = m[section].get(key, default)
        out[key] = float(value) if typ == NUMBER else value
    return out


def pip_install(*packages: str) -> str:
    """How to install an extra's `packages`, as README's Install does: into agentd's own venv
    (a bare `pip install 'agentd[...]'` elsewhere would fetch an unrelated PyPI package called
    agentd), at the versions the tests ran with (constraints.txt, in the source tree)."""
    return (
        "in agentd's source tree (its constraints.txt pins the versions agentd was tested "
        f"with) run {sys.executable} -m pip install -c constraints.txt {' '.join(packages)}"
    )


POSTGRES_MISSING = (
    "store.url: PostgreSQL needs the asyncpg package, which is not installed: "
    + pip_install("asyncpg")
)


def _store_url(store: dict[str, Any], path_in_file: bool, env: Mapping[str, str]) -> PgUrl | None:
    """`[store] url` (with `password`/`password_file`/credential store-password), or None."""
    if not store["url"]:
        if store["password"] or store["password_file"]:
            raise ConfigError("store.password: only used with store.url (PostgreSQL)")
        return None
    if path_in_file and store["path"] != _SCHEMA["store"]["path"][1]:
        raise ConfigError(
            "store: both url (PostgreSQL) and path (SQLite) are set; keep one "
            "(remove path to use PostgreSQL)"
        )
    url = PgUrl.parse(store["url"], _secret("store", store, "password", env))
    if not postgres_installed():
        raise ConfigError(POSTGRES_MISSING)
    return url


def postgres_installed() -> bool:
    """Whether the extra `agentd[postgres]` (asyncpg) is installed (found, not imported)."""
    try:
        return importlib.util.find_spec("asyncpg") is not None
    except (ImportError, ValueError):
        return False


def _voipbin(v: dict[str, Any], env: Mapping[str, str]) -> VoipbinConfig:
    api_url, ws_url = _voipbin_urls(v["api_url"], v["ws_url"])
    accesskey, token, password = _voipbin_credentials(v, env)
    return VoipbinConfig(
        api_url=api_url,
        ws_url=ws_url,
        accesskey=accesskey,
        token=token,
        username=v["username"],
        password=password,
        rate_per_s=v["rate_per_s"],
        burst=int(v["burst"]),
        timeout_s=v["timeout_s"],
        find_calls_s=v["find_calls_s"],
    )


def _voipbin_urls(api_url: str, ws_url: str) -> tuple[str, str]:
    api_url = api_url.rstrip("/")
    if urlsplit(api_url).scheme not in ("http", "https") or not urlsplit(api_url).netloc:
        # the URL itself is not echoed: a mistyped one may hold a password or a key
        raise ConfigError(f"voipbin.api_url: not an http(s) URL ({_scheme_of(api_url)})")
    _no_credentials_in("voipbin.api_url", api_url)
    ws_url = ws_url or default_ws_url(api_url)
    if urlsplit(ws_url).scheme not in ("ws", "wss"):
        raise ConfigError(f"voipbin.ws_url: not a ws(s) URL ({_scheme_of(ws_url)})")
    _no_credentials_in("voipbin.ws_url", ws_url)
    return api_url, ws_url


def _no_credentials_in(key: str, url: str) -> None:
    """Refuse a VoIPBIN URL with a user part or a query: agentd sends its credentials in
    headers, so one in the URL is a mistake, and the URL is printed (`check-config`) and
    logged (`agentd.start`), and the REST client appends paths to it (a query would swallow
    them). The URL is not echoed: what makes it wrong is the secret."""
    parts = urlsplit(url)
    if "@" in parts.netloc:
        raise ConfigError(
            f"{key}: must not carry a user or password (user@ or user:password@); put the "
            "credentials in voipbin.accesskey, token, or username + password"
        )
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise ConfigError(
            f"{key}: must not carry a query string (?...) or fragment; put the access key in "
            "voipbin.accesskey (or accesskey_file), never in the URL"
        )


def _scheme_of(url: str) -> str:
    scheme = urlsplit(url).scheme
    return f"scheme {scheme!r}" if scheme and "://" in url else "no scheme://"


NO_CREDENTIALS = "voipbin: no credentials"


def _voipbin_credentials(
    v: dict[str, Any], env: Mapping[str, str]
) -> tuple[Secret | None, Secret | None, Secret | None]:
    """(accesskey, token, password): at least one way to authenticate."""
    accesskey = _secret("voipbin", v, "accesskey", env)
    token = _secret("voipbin", v, "token", env)
    password = _secret("voipbin", v, "password", env)
    if v["username"] and password is None:
        raise ConfigError("voipbin.password: username is set but no password or password_file")
    if not (accesskey or token or (v["username"] and password)):
        raise ConfigError(
            f"{NO_CREDENTIALS}: set accesskey (or accesskey_file, AGENTD_VOIPBIN_ACCESSKEY, "
            "the systemd credential voipbin-accesskey), token, or username + password"
        )
    if accesskey and accesskey.reveal().count(".") == 2:
        raise ConfigError("voipbin.accesskey: this looks like a JWT; put it in voipbin.token")
    return accesskey, token, password


def _call_settings(agent: dict[str, Any]) -> CallSettings:
    values = {key: agent[key] for key in CALL_KEYS}
    if values["cut_method"] == "auto":
        values["cut_method"] = None
    values["transfer_numbers"] = _transfer_numbers(list(values["transfer_numbers"]))
    values["backchannels"] = tuple(str(w).lower().strip() for w in values["backchannels"])
    language = canonical_language(str(values["language"]))
    if language is None:
        # VoIPBIN would not refuse it: it would transcribe in en-US, whatever the caller speaks
        raise ConfigError(
            f"agent.language: {values['language']!r} is not a BCP 47 language tag "
            '(e.g. "en-US", "ko-KR", "ja-JP")'
        )
    values["language"] = language
    call = CallSettings(**values)
    if call.chars_per_s < 0:
        raise ConfigError("agent.chars_per_s: must not be negative (0: by the language's script)")
    if call.say_latency_s < 0:
        raise ConfigError("agent.say_latency_s: must not be negative")
    if call.history_limit < 0:
        raise ConfigError("agent.history_limit: must not be negative (0: the whole call)")
    return call


# ---- [agent]: our numbers and the voice ----------------------------------------------------

EVERY_CALL = "*"
_E164 = re.compile(r"\+[1-9][0-9]{1,14}")  # what VoIPBIN's tel addresses carry: + and digits
# what each provider's voice ids look like (bin-tts-manager/pkg/streaminghandler/*.go)
_VOICE_SHAPES = (
    ("elevenlabs", re.compile(r"[A-Za-z0-9]{20}")),  # e.g. EXAVITQu4vr4xnSDxMaL
    ("gcp", re.compile(r"[a-z]{2,3}-[A-Z]{2}-\S+")),  # e.g. en-US-Chirp3-HD-Charon
    ("aws", re.compile(r"[A-Z][a-z]+")),  # Polly: e.g. Joanna
)
# An empty voice_id gets the provider's default voice. VoIPBIN's per-language voice tables are
# keyed "english_*", "german_*"..., but looked up with the language code ("de_*"), so they never
# match: the default is English whatever the language. ElevenLabs' multilingual model copes;
# Google's and Polly's voices speak only their own language.
_ENGLISH_DEFAULT_VOICE = {"gcp": "en-US-Chirp3-HD-Charon", "aws": "Joanna"}


def _numbers(values: list[str]) -> tuple[str, ...]:
    """`agent.numbers` as the dispatcher takes it: our numbers, or () for `["*"]`."""
    if not values:
        raise ConfigError(
            'agent.numbers: not set: list the numbers agentd serves, e.g. ["+15551234567"], '
            'or ["*"] for every call of the account'
        )
    if EVERY_CALL in values:
        if len(values) > 1:
            raise ConfigError('agent.numbers: "*" (every call) cannot be mixed with numbers')
        return ()
    for number in values:
        phone_number("agent.numbers", number, ', nor "*"')
    return tuple(values)


def _flow_id(value: str) -> str:
    """`agent.flow_id`: VoIPBIN ignores one that is not a uuid (`uuid.FromStringOrNil` in
    `bin-api-manager` `server/calls.go`), and a call without a flow hangs up at the answer."""
    if value:
        try:
            uuid.UUID(value)
        except ValueError:
            raise ConfigError(
                f"agent.flow_id: {value!r} is not a flow id (a uuid); VoIPBIN would ignore it "
                "and hang the call up when it is answered"
            ) from None
    return value


def _transfer_numbers(values: list[object]) -> tuple[str, ...]:
    """The numbers the agent may transfer to: an allow-list, so a caller cannot talk the model
    into dialling a premium number. Empty: transfers off."""
    return tuple(phone_number("agent.transfer_numbers", n) for n in values)


def _caller_id(value: str, numbers: tuple[str, ...]) -> str:
    """The number `agentd call` calls from: `agent.caller_id`, else our first number."""
    if value:
        phone_number("agent.caller_id", value)
    return value or (numbers[0] if numbers else "")


def phone_number(key: str, value: object, alternative: str = "") -> str:
    """`value` if it is a phone number as VoIPBIN's tel addresses carry it, else a config error
    naming `key` (and what else the key takes)."""
    if not isinstance(value, str) or not _E164.fullmatch(value):
        raise ConfigError(
            f"{key}: {value!r} is not a phone number in E.164 form "
            f'(+, a country code, up to 15 digits in all, e.g. "+15551234567"){_why(value)}'
            f"{alternative}"
        )
    return value


def _why(value: object) -> str:
    """What is wrong with a number that looks like one (+ and digits), or nothing."""
    if not isinstance(value, str) or not value.startswith("+") or not value[1:].isdigit():
        return ""
    if not value[1:].isascii():  # str.isdigit() takes any script's digits (full-width ones)
        return ": digits other than 0-9"
    if value[1:2] == "0":
        return ": no country code starts with 0"
    digits = len(value) - 1
    return f": {digits} digits" if digits > 15 else ": too short"


def _drain_warnings(drain_s: float) -> tuple[str, ...]:
    """A drain that systemd's SIGKILL would cut: its goodbyes unsaid and, without a store,
    its calls' sessions left billing."""
    if drain_s + SHUTDOWN_HANG_UP_S < UNIT_TIMEOUT_STOP_S:
        return ()
    return (
        f"daemon.drain_s: {drain_s:g} s, and up to {SHUTDOWN_HANG_UP_S:g} s more to hang up the "
        f"calls left, ends after the systemd unit's TimeoutStopSec ({UNIT_TIMEOUT_STOP_S:g} s), "
        "which kills agentd mid-drain: lower it, or raise TimeoutStopSec in a drop-in "
        "(systemctl edit agentd)",
    )


def _voice_warnings(call: CallSettings) -> tuple[str, ...]:
    """Voice settings VoIPBIN accepts but the caller would regret: a voice id shaped like
    another provider's (passed on unchecked, refused at the first /say: 404 for every sentence,
    the caller hears nothing), or no voice for a language VoIPBIN's default voice cannot speak."""
    voice, provider, language = call.voice_id, call.tts_provider, call.language
    if not voice:
        english = _ENGLISH_DEFAULT_VOICE.get(provider)
        if english is None or language.lower().startswith("en"):
            return ()
        return (
            f"agent.voice_id: not set, so VoIPBIN uses its default {provider} voice, the English "
            f"{english!r}, whatever agent.language says ({language!r}); set a {language} voice",
        )
    looks = next((name for name, shape in _VOICE_SHAPES if shape.fullmatch(voice)), None)
    if looks is None or looks == provider:
        return ()
    return (
        f"agent.voice_id: {voice!r} looks like a voice id of {looks} but tts_provider is "
        f'{provider!r}; {provider} will likely refuse it (set voice_id = "" for '
        f"VoIPBIN's default {provider} voice)",
    )


def _backend(b: dict[str, Any], env: Mapping[str, str]) -> BackendConfig:
    api_key = _secret("backend", b, "api_key", env)
    del b["api_key_file"]
    backend = BackendConfig(**{**b, "api_key": api_key})
    kind = backend.kind
    if kind == "http" and not backend.url:
        raise ConfigError("backend.url: the http backend needs the URL of your service")
    if kind == "python" and ":" not in backend.callable:
        raise ConfigError("backend.callable: expected 'module:function'")
    url_key = {"openai": "base_url", "http": "url"}.get(kind)
    if url_key and urlsplit(getattr(backend, url_key)).scheme not in ("http", "https"):
        raise ConfigError(f"backend.{url_key}: not an http(s) URL")
    if url_key:
        learn_url(getattr(backend, url_key))  # a key in the URL is a secret like api_key
    return backend


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
        path = default_status_socket(env, store_path)
        if len(os.fsencode(path)) > _SUN_PATH_MAX:
            # found out at start otherwise, as a log line, with `agentd status` unable to ask
            raise ConfigError(
                f"status.socket: the default beside the store, {path!r}, is too long for a "
                'Unix socket (max 107 bytes): set [status] socket to a shorter path, or "" '
                "to turn it off"
            )
        return path
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


def _lease_s(value: float) -> float:
    # below 1 s a renew every lease/3 races the database's own latency; above 60 s a dead
    # replica's callers wait that long in silence
    if not 1.0 <= value <= 60.0:
        raise ConfigError(f"store.lease_s: {value:g} is out of range (1 to 60 seconds)")
    return value


def _metrics_listen(value: str) -> str:
    if value:
        parse_listen(value)
    return value


OTEL_MISSING = (
    "otel.enabled: traces need the OpenTelemetry packages, which are not installed: "
    + pip_install("opentelemetry-sdk", "opentelemetry-exporter-otlp-proto-http")
)


def _otel(values: dict[str, Any]) -> OtelConfig:
    """`[otel]`: when enabled, an http(s) collector URL and the optional extra installed."""
    otel = OtelConfig(**values)
    if not otel.enabled:
        return otel
    parts = urlsplit(otel.endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        # not echoed, as the VoIPBIN URLs are not: a collector's URL may carry its key
        raise ConfigError(
            f"otel.endpoint: not an http(s) URL ({_scheme_of(otel.endpoint)}; "
            "the collector's OTLP/HTTP receiver, e.g. http://127.0.0.1:4318)"
        )
    if not otel.service_name.strip():
        raise ConfigError("otel.service_name: must not be empty")
    if not otel_installed():
        raise ConfigError(OTEL_MISSING)
    return otel


def otel_installed() -> bool:
    """Whether the extra `agentd[otel]` is installed (found, not imported)."""
    try:
        return all(
            importlib.util.find_spec(name) is not None
            for name in ("opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.http")
        )
    except (ImportError, ValueError):  # a parent package missing, or a stub without a spec
        return False
