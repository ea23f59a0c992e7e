"""A connection that failed, in words an operator can act on: the VoIPBIN client and the HTTP
backends say it alike.

aiohttp's own text (`Cannot connect to host h:443 ssl:default [Connect call failed ('1.2.3.4',
443)]`) does not say refused, unreachable or unresolvable. Host and port only: a URL's path and
query stay out of it.
"""

from __future__ import annotations

import os
import socket
import ssl

import aiohttp


def cannot_connect(exc: aiohttp.ClientConnectorError) -> str:
    """`cannot resolve HOST: why`, or `cannot connect to HOST:PORT: why`."""
    err = exc.os_error
    if isinstance(exc, aiohttp.ClientConnectorDNSError) or isinstance(err, socket.gaierror):
        # getaddrinfo's codes are not errnos: os.strerror(-2) is "Unknown error -2"
        return f"cannot resolve {exc.host}: {err.strerror or err}"
    where = f"cannot connect to {exc.host}:{exc.port}"
    if isinstance(err, ssl.SSLError | ssl.CertificateError):
        # OpenSSL's error code, not an errno: os.strerror(1) would say "Operation not permitted"
        return f"{where}: TLS: {err.strerror or err}"
    # asyncio's text ("Connect call failed (...)") does not say refused or unreachable
    why = os.strerror(err.errno) if err.errno and err.errno > 0 else str(err)
    return f"{where}: {why or type(err).__name__}"
