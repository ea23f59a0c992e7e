"""Secrets that cannot leak by accident: masked `repr`, and a registry the log redactor scrubs."""

from __future__ import annotations

import re
from typing import Final

_MASK: Final = "***"
_known: set[str] = set()
_known_re: re.Pattern[str] | None = None  # every known secret in one pattern, rebuilt on change
# credential-looking query parameters, in case a URL reaches a message some other way
_QUERY_RE = re.compile(r"(?i)\b(accesskey|token|api_key|password)=[^&\s'\"]+")


class Secret:
    """A credential. `str()`/`repr()` show `***`; `reveal()` is the one way to read it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value
        # too short a value would scrub ordinary words from every log line
        if len(value) >= 6 and value not in _known:
            global _known_re
            _known.add(value)
            _known_re = re.compile("|".join(map(re.escape, sorted(_known, key=len, reverse=True))))

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


def redact(text: str) -> str:
    """Replace every known secret, and any credential-looking query value, with `***`."""
    if _known_re is not None:
        text = _known_re.sub(_MASK, text)
    return _QUERY_RE.sub(lambda m: f"{m.group(1)}={_MASK}", text)
