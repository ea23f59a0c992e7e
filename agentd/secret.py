"""Secrets that cannot leak by accident: masked `repr`, and a registry the log redactor scrubs."""

from __future__ import annotations

import base64
import contextlib
import json
import re
from typing import Final
from urllib.parse import parse_qsl, unquote, unquote_plus, urlsplit, urlunsplit

_MASK: Final = "***"
_known: set[str] = set()
_known_re: re.Pattern[str] | None = None  # every known secret in one pattern, rebuilt on change
# the same for rendered JSON lines (bytes): each secret as is and as JSON escapes it (a quote, a
# backslash or a control character in a password must not slip through as `\"`)
_known_bytes: tuple[bytes, ...] = ()
_known_bytes_re: re.Pattern[bytes] | None = None
# credential-looking query parameters, in case a URL reaches a message some other way: the
# names services put keys in (`access_token`, `api-key`, Azure's `code`, `sig`...), with any
# prefix. A harmless `status_code=500` in a message is masked too: better than a key shown.
_NAMES: Final = r"[\w-]*?(?:accesskey|token|key|password|passwd|secret|code|sig|signature|auth)"
_QUERY_RE = re.compile(rf"(?i)(?<![\w-])({_NAMES})=[^&\s'\"]+")
_QUERY_BYTES_RE = re.compile(rb"(?i)(?<![\w-])(" + _NAMES.encode() + rb")=[^&\s'\"\\]+")


class Secret:
    """A credential. `str()`/`repr()` show `***`; `reveal()` is the one way to read it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value
        # too short a value would scrub ordinary words from every log line
        if len(value) >= 6 and value not in _known:
            _learn(value)

    def reveal(self) -> str:
        """The secret value, for the one place that sends it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def _learn(value: str) -> None:
    global _known_re, _known_bytes, _known_bytes_re
    _known.add(value)
    longest_first = sorted(_known, key=len, reverse=True)
    _known_re = re.compile("|".join(map(re.escape, longest_first)))
    forms = {f for v in longest_first for f in (v, json.dumps(v, ensure_ascii=False)[1:-1])}
    _known_bytes = tuple(sorted((f.encode() for f in forms), key=len, reverse=True))
    _known_bytes_re = re.compile(b"|".join(map(re.escape, _known_bytes)))


def redact_bytes(line: bytes) -> bytes:
    """`redact` for a rendered JSON line, fast when there is nothing to scrub (the usual case)."""
    if _known_bytes_re is not None:
        for form in _known_bytes:
            if form in line:
                line = _known_bytes_re.sub(b"***", line)
                break
    if b"=" in line:
        line = _QUERY_BYTES_RE.sub(lambda m: m.group(1) + b"=***", line)
    return line


def redact(text: str) -> str:
    """Replace every known secret, and any credential-looking query value, with `***`."""
    if _known_re is not None:
        text = _known_re.sub(_MASK, text)
    return _QUERY_RE.sub(lambda m: f"{m.group(1)}={_MASK}", text)


def learn_url(url: str) -> None:
    """Register the password and every query value of a configured URL as secrets: a service
    may take its key in the URL (`?code=` for Azure Functions), and an error that quotes the
    URL (a redirect loop, a bad redirect) must not show it. Its user part is sent as
    `Authorization: Basic base64(user:password)`, which a server may echo in an error body:
    that form is a secret too, and a user alone is a token."""
    parts = urlsplit(url)
    if parts.password:
        Secret(parts.password)
        Secret(unquote(parts.password))
    elif parts.username:
        Secret(parts.username)
        Secret(unquote(parts.username))
    if parts.username is not None:
        # as aiohttp sends it (BasicAuth.from_url: the decoded parts, latin-1 by default)
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        for encoding in ("latin-1", "utf-8"):
            try:
                Secret(base64.b64encode(pair.encode(encoding)).decode("ascii"))
            except UnicodeEncodeError:
                continue
    for value in _query_values(url):
        Secret(value)


def _query_values(url: str) -> set[str]:
    """Each value of `url`'s query (a bare `?key` too) in every form it may be shown in: as
    written, decoded (`+` as a space or not), and as aiohttp's URL type re-encodes it for an
    error's `url=` (`%2F` decoded, `%3D` kept): a key of base64 or with a space would
    otherwise show in the form it is sent in."""
    from yarl import URL  # aiohttp's: what its exceptions print

    queries = [urlsplit(url).query]
    with contextlib.suppress(ValueError):  # a URL yarl refuses is never sent, nor shown
        queries.append(URL(url).raw_query_string)
    found: set[str] = set()
    for query in queries:
        for part in query.split("&"):
            raw = part.partition("=")[2] if "=" in part else part
            found |= {raw, unquote(raw), unquote_plus(raw)}
    found.discard("")
    return found


def learn_headers(text: str) -> None:
    """Register the values of headers given as `name=value,name=value` (URL-encoded), as the
    OpenTelemetry exporter reads `OTEL_EXPORTER_OTLP_HEADERS`, as secrets: each value as
    written and decoded, and the credential of a `<scheme> <credential>` value (`Bearer x`)
    alone, as a server may echo it. A piece that is no `name=value` (`Authorization: Bearer x`,
    the header as an HTTP request writes it) is registered whole too: the exporter logs a
    malformed piece as it is, to say it ignored it."""
    for raw in text.split(","):
        piece = raw.strip()
        name, sep, value = piece.partition("=")
        if not sep or " " in name.strip() or ":" in name:
            Secret(piece)
            value = piece.partition(":")[2]
        for form in {value.strip(), unquote(value).strip()}:
            Secret(form)
            credential = form.partition(" ")[2].strip()
            if credential:
                Secret(credential)


def display_url(url: str) -> str:
    """An http(s) `url` fit to print: its user part (`user:password@`, or a token as the user
    alone), its query values (a bare `?key` whole) and its fragment masked."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{_MASK}@{netloc.rsplit('@', 1)[1]}"
    query = "&".join(
        f"{k}={_MASK}" if v else _MASK for k, v in parse_qsl(parts.query, keep_blank_values=True)
    )
    fragment = _MASK if parts.fragment else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, fragment))
