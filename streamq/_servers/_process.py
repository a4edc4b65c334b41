"""Process-level helpers shared by :class:`LocalRedis` and :class:`LocalCluster`.

Free loopback ports (never one of the well-known Redis ports), a tiny blocking
RESP2 client for readiness checks and admin commands, ``INFO`` parsing, and the
Linux parent-death signal that takes a server down with the Python process that
started it. Only the standard library is used here.
"""

from __future__ import annotations

import ctypes
import random
import signal
import socket
import ssl
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Self, TypeAlias

from ._errors import RespError, ServerStartError

__all__ = [
    "_HOST",
    "RespReply",
    "_RespConnection",
    "_free_port",
    "_info_fields",
    "_pdeathsig_preexec",
]

#: A parsed RESP2 reply from :meth:`LocalRedis.execute`.
RespReply: TypeAlias = str | int | list["RespReply"] | None

_HOST = "127.0.0.1"
# Ports other Redis deployments on a developer machine usually own; never hand them out.
_RESERVED_PORTS = frozenset({6379, 6380, 16379, 16380, 26379})


def _port_is_free(port: int) -> bool:
    if port in _RESERVED_PORTS or not 1024 <= port <= 65535:
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((_HOST, port))
        except OSError:
            return False
    return True


def _free_port(*, with_bus_offset: bool = False, exclude: Iterable[int] = ()) -> int:
    """Pick a currently free loopback port.

    Args:
        with_bus_offset: Also require ``port + 10000`` to be free, for servers that
            derive the cluster bus port from the client port.
        exclude: Ports that must not be returned (already promised to a sibling).

    Returns:
        A port that was free a moment ago; callers retry if another process wins it.
    """
    excluded = set(exclude)
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((_HOST, 0))
            port: int = sock.getsockname()[1]
        if port in excluded or port in _RESERVED_PORTS:
            continue
        if not with_bus_offset:
            return port
        if port + 10000 <= 65535 and port + 10000 not in excluded and _port_is_free(port + 10000):
            return port
    # The kernel's ephemeral range may sit too high for a +10000 bus port; scan a low range.
    for _ in range(2000):
        port = random.randint(10000, 30000)
        if port in excluded or (with_bus_offset and port + 10000 in excluded):
            continue
        if _port_is_free(port) and (not with_bus_offset or _port_is_free(port + 10000)):
            return port
    raise ServerStartError("could not find a free port on 127.0.0.1")


class _RespConnection:
    """A minimal blocking RESP2 client used for readiness checks and admin commands.

    redis-py's sync client would do, but its default retries with backoff and its
    connection handshake (HELLO, CLIENT SETINFO) make a tight readiness poll slow
    and version-dependent; this one does exactly one round trip per call.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout: float,
        ssl_context: ssl.SSLContext | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        sock = socket.create_connection((host, port), timeout=timeout)
        try:
            if ssl_context is not None:
                sock = ssl_context.wrap_socket(sock, server_hostname=host)
            self._sock = sock
            self._file = sock.makefile("rb")
            if password is not None:
                if username is None:
                    self.call("AUTH", password)
                else:
                    self.call("AUTH", username, password)
        except BaseException:
            sock.close()
            raise

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def call(self, *args: str | int | bytes) -> RespReply:
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            data = arg if isinstance(arg, bytes) else str(arg).encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        self._sock.sendall(b"".join(parts))
        return self._read()

    def _read(self) -> RespReply:
        line = self._file.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError("connection closed by server")
        kind, payload = line[:1], line[1:-2]
        if kind == b"+":
            return payload.decode(errors="replace")
        if kind == b"-":
            raise RespError(payload.decode(errors="replace"))
        if kind == b":":
            return int(payload)
        if kind == b"$":
            length = int(payload)
            if length < 0:
                return None
            data = self._file.read(length + 2)
            if len(data) != length + 2:
                raise ConnectionError("connection closed by server")
            return data[:-2].decode(errors="replace")
        if kind == b"*":
            length = int(payload)
            if length < 0:
                return None
            return [self._read() for _ in range(length)]
        raise ConnectionError(f"unexpected RESP reply type {kind!r}")


def _info_fields(text: RespReply) -> dict[str, str]:
    fields: dict[str, str] = {}
    if isinstance(text, str):
        for line in text.splitlines():
            key, sep, value = line.partition(":")
            if sep and not key.startswith("#"):
                fields[key.strip()] = value.strip()
    return fields


def _pdeathsig_preexec() -> Callable[[], None] | None:
    """Ask Linux to SIGKILL the server when this process dies, even by SIGKILL.

    atexit and finalizers cover normal exits and crashing tests, but not an
    ``os._exit`` (pytest-timeout's thread method) or a SIGKILL of pytest. The
    signal fires when the *thread* that forked exits, so it is only used from the
    main thread, which lives as long as the process.
    """
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    sigkill = int(signal.SIGKILL)

    def preexec() -> None:
        prctl(pr_set_pdeathsig, sigkill, 0, 0, 0)

    return preexec
