"""Credentials: HS256 JWTs (stdlib ``hmac``) and ``vb_`` access keys, read the way the server does.

Precedence (docs/protocol.md §2): cookie ``token``, ``?token=``, ``Authorization: Bearer``, cookie
``accesskey``, ``?accesskey=``. The first non-empty one wins even when it is invalid, and
``token``/Bearer values are always parsed as JWTs (an access key there is refused).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

from aiohttp import web

from agentd.sim.clock import fixed_time, go_time, utcnow

#: Agent permission bits (``bin-agent-manager/models/agent/agent.go``).
PERMISSION_PROJECT_SUPER_ADMIN = 0x1
PERMISSION_CUSTOMER_AGENT = 0x10
PERMISSION_CUSTOMER_ADMIN = 0x20
PERMISSION_CUSTOMER_MANAGER = 0x40


@dataclass(frozen=True)
class Identity:
    """Who a request authenticated as."""

    kind: Literal["agent", "accesskey"]
    customer_id: str
    #: The agent's id for JWTs; ``None`` for access keys (they cannot use ``agent_id:`` topics).
    agent_id: str | None
    #: Permission bits; an access key counts as CustomerAdmin
    #: (``bin-api-manager/models/auth/auth.go``, ``HasPermission``).
    permission: int = PERMISSION_CUSTOMER_ADMIN

    @property
    def customer_admin(self) -> bool:
        """CustomerAdmin or CustomerManager (or super admin): what customer-scoped resources need.

        ``bin-api-manager/pkg/servicehandler/etc.go`` ``hasPermission`` with
        ``PermissionCustomerAdmin|PermissionCustomerManager``, the check of ``GET /customer``,
        calls, transcribes, speakings and transfers, and of customer WebSocket topics.
        """
        wanted = PERMISSION_PROJECT_SUPER_ADMIN | PERMISSION_CUSTOMER_ADMIN
        return bool(self.permission & (wanted | PERMISSION_CUSTOMER_MANAGER))


class AuthError(Exception):
    """No or bad credentials; ``reason`` is the envelope reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Authenticator:
    """Issues and checks the credentials of the simulator's single customer."""

    def __init__(
        self,
        customer_id: str,
        agent_id: str,
        username: str,
        token_ttl_s: float,
        plain_username: str = "agent",
    ) -> None:
        self.customer_id = customer_id
        self.agent_id = agent_id
        self.username = username
        #: The second agent: CustomerAgent permission only (no customer-admin rights).
        self.plain_agent_id = str(uuid.uuid4())
        self.plain_username = plain_username
        self.token_ttl_s = token_ttl_s
        self.accesskey = "vb_" + secrets.token_urlsafe(24)
        #: Deleted or expired: refused from now on (401), but an open WebSocket stays open.
        self.accesskey_revoked = False
        self._key = secrets.token_bytes(32)
        self._issued: set[str] = set()
        self._revoked: set[str] = set()

    # -- JWT -------------------------------------------------------------------------------------

    def make_token(self, ttl_s: float | None = None, *, admin: bool = True) -> str:
        """A signed agent JWT valid for ``ttl_s`` (negative = already expired).

        ``admin=False`` signs for the second agent, whose permission is CustomerAgent only.
        """
        ttl = self.token_ttl_s if ttl_s is None else ttl_s
        now = utcnow()
        claims: dict[str, Any] = {
            "type": "agent",
            "agent": {
                "id": self.agent_id if admin else self.plain_agent_id,
                "customer_id": self.customer_id,
                "username": self.username if admin else self.plain_username,
                "name": "simulated agent",
                "detail": "",
                "ring_method": "ringall",
                "status": "available",
                "permission": PERMISSION_CUSTOMER_ADMIN if admin else PERMISSION_CUSTOMER_AGENT,
                "tag_ids": [],
                "addresses": [],
                "tm_create": go_time(now),
            },
            # The server has no standard `exp`: it compares this string with the current time.
            "expire": fixed_time(now + timedelta(seconds=ttl)),
        }
        header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
        payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
        signing_input = f"{header}.{payload}".encode("ascii")
        sig = _b64(hmac.new(self._key, signing_input, hashlib.sha256).digest())
        token = f"{header}.{payload}.{sig}"
        self._issued.add(token)
        return token

    def revoke_accesskey(self) -> None:
        """Delete the access key (or let it expire): ``lib/middleware/authenticate.go``
        ``authenticateAccesskey`` refuses a key with ``tm_delete`` set or ``tm_expire`` past
        with 401 ``INVALID_CREDENTIALS``, as it does a key it cannot look up. Only requests
        are checked: a WebSocket opened before stays open (``websockhandler`` has no auth)."""
        self.accesskey_revoked = True

    def revoke_all(self) -> None:
        """Refuse every JWT issued so far (simulates their expiry)."""
        self._revoked |= self._issued

    def check_token(self, token: str) -> Identity:
        """Validate a JWT; raises :class:`AuthError` ``INVALID_CREDENTIALS``."""
        parts = token.split(".")
        if len(parts) != 3 or token in self._revoked:
            raise AuthError("INVALID_CREDENTIALS")
        signing_input = f"{parts[0]}.{parts[1]}".encode("ascii", "replace")
        expected = _b64(hmac.new(self._key, signing_input, hashlib.sha256).digest())
        if not hmac.compare_digest(expected, parts[2]):
            raise AuthError("INVALID_CREDENTIALS")
        try:
            claims = json.loads(_unb64(parts[1]))
            expire = str(claims["expire"])
            agent = claims["agent"]
            identity = Identity(
                "agent", str(agent["customer_id"]), str(agent["id"]), int(agent["permission"])
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise AuthError("INVALID_CREDENTIALS") from exc
        if expire <= fixed_time(utcnow()):
            raise AuthError("INVALID_CREDENTIALS")
        return identity

    # -- request ---------------------------------------------------------------------------------

    def authenticate(self, request: web.Request) -> Identity:
        """The identity of ``request``; raises :class:`AuthError`."""
        cookie_token = request.cookies.get("token", "")
        query_token = request.query.get("token", "")
        auth_header = request.headers.get("Authorization", "")
        bearer = auth_header.split("Bearer ", 1)[1] if "Bearer " in auth_header else ""
        for token in (cookie_token, query_token, bearer):
            if token:
                return self.check_token(token)
        key = request.cookies.get("accesskey", "") or request.query.get("accesskey", "")
        if key:
            if hmac.compare_digest(key, self.accesskey) and not self.accesskey_revoked:
                return Identity("accesskey", self.customer_id, None)
            raise AuthError("INVALID_CREDENTIALS")
        raise AuthError("AUTHENTICATION_REQUIRED")
