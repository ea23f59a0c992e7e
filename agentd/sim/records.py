"""The log of REST requests the simulator served (for assertions in tests)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

#: Query parameters and body fields whose values are never recorded.
SECRET_KEYS = frozenset({"token", "accesskey", "password"})


@dataclass
class Request:
    """One served request: ``path`` has no query string; credential values are ``"***"``."""

    t: float
    method: str
    path: str
    query: dict[str, str]
    body: Any
    status: int

    def to_json(self) -> dict[str, Any]:
        """Plain dict for the control API."""
        return {
            "t": self.t,
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "body": self.body,
            "status": self.status,
        }


def redact_query(query: dict[str, str]) -> dict[str, str]:
    """Copy of ``query`` with credential values masked."""
    return {k: ("***" if k in SECRET_KEYS else v) for k, v in query.items()}


def redact_body(body: Any) -> Any:
    """Copy of a JSON body with credential fields masked (top level only: login bodies)."""
    if isinstance(body, dict):
        return {k: ("***" if k in SECRET_KEYS else v) for k, v in body.items()}
    return body


def matching(requests: list[Request], method: str, path_regex: str) -> list[Request]:
    """Requests whose method equals ``method`` (case-insensitive) and path matches the regex."""
    pattern = re.compile(path_regex)
    wanted = method.upper()
    return [r for r in requests if r.method == wanted and pattern.search(r.path)]
