"""Running a ``streamq`` command: exit codes, the Redis URL, connecting, errors.

The exit codes (:data:`EXIT_CODES`) are part of the command's interface. This
module checks the URL (``--url``, ``$REDIS_URL`` or the default), connects with
a clear message when the server is unreachable or refuses the credentials, and
runs one async command under :func:`_run`, which turns Ctrl-C and SIGTERM into a
clean stop and every expected error into a one-line message and its exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

from .. import _admin
from .._errors import NetworkError, RedisError, StreamqError, convert
from .._transport import open_transport
from ._output import _redact

__all__ = [
    "CONNECTION",
    "DEFAULT_URL",
    "EXIT_CODES",
    "INCOMPLETE",
    "NOT_FOUND",
    "NO_SERVER",
    "OK",
    "REDIS_ERROR",
    "USAGE",
    "ConnectError",
    "UsageError",
    "_connect",
    "_run",
    "_url",
]

OK = 0
USAGE = 1
NOT_FOUND = 2
CONNECTION = 3
REDIS_ERROR = 4
NO_SERVER = 5
INCOMPLETE = 6

#: Exit codes of the ``streamq`` command, by number.
EXIT_CODES: dict[int, str] = {
    OK: "success",
    USAGE: "usage error: bad arguments or URL",
    NOT_FOUND: "not found: the stream, group or dead-letter entry does not exist",
    CONNECTION: "cannot connect: server unreachable, refused, timed out, or credentials refused",
    REDIS_ERROR: "Redis refused a command (WRONGTYPE, NOPERM, server too old, ...)",
    NO_SERVER: "no Redis server binary to start (demo/bench without --url)",
    INCOMPLETE: "the demo or benchmark did not finish (or failed its own checks)",
    130: "interrupted (Ctrl-C)",
    143: "terminated (SIGTERM)",
}

DEFAULT_URL = "redis://127.0.0.1:6379/0"


class UsageError(Exception):
    """A bad argument that argparse cannot check (exit code 1)."""


class ConnectError(StreamqError):
    """The server could not be reached or refused the credentials (exit code 3)."""


def _url(args: argparse.Namespace) -> str:
    url: str = args.url or os.environ.get("REDIS_URL") or DEFAULT_URL
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise UsageError(f"{_redact(url)!r} is not a Redis URL (redis://, rediss:// or unix://)")
    try:
        aioredis.Redis.from_url(url)  # parses only; connects lazily
    except ValueError as exc:
        raise UsageError(f"bad Redis URL {_redact(url)!r}: {exc}") from None
    return url


@contextlib.asynccontextmanager
async def _connect(args: argparse.Namespace) -> Any:
    url = _url(args)
    transport = open_transport(url, args.timeout)
    try:
        try:
            await transport.server_info()
        except StreamqError as exc:
            raise _connection_error(exc, url) from None
        except Exception as exc:
            raise _connection_error(convert(exc, "connect"), url) from None
        yield transport
    finally:
        await transport.aclose()


def _connection_error(exc: StreamqError, url: str) -> StreamqError:
    cause = exc.error if exc.error is not None else exc
    if isinstance(exc, NetworkError):
        return ConnectError(
            f"cannot connect to {_redact(url)}: {cause} (is the server running? "
            "pass --url or set REDIS_URL)",
            error=exc.error,
        )
    if _is_auth(exc):
        return ConnectError(
            f"cannot connect to {_redact(url)}: the server refused the credentials "
            f"({cause}); put the user and password in the URL: "
            "redis://user:password@host:port/db",
            error=exc.error,
        )
    return exc


def _is_auth(exc: StreamqError) -> bool:
    text = str(exc)
    return any(
        s in text for s in ("WRONGPASS", "NOAUTH", "AuthenticationError", "invalid password")
    )


def _exit_code(exc: BaseException) -> int:
    if isinstance(exc, UsageError):
        return USAGE
    if isinstance(exc, _admin.NotFoundError):
        return NOT_FOUND
    if isinstance(exc, ConnectError | NetworkError):
        return CONNECTION
    if isinstance(exc, StreamqError) and _is_auth(exc):
        return CONNECTION
    if isinstance(exc, RedisError | StreamqError):
        return REDIS_ERROR
    return INCOMPLETE


def _run(args: argparse.Namespace, command: Callable[[argparse.Namespace], Awaitable[int]]) -> int:
    """Run one async command: errors become messages and exit codes; signals stop it cleanly."""
    received: list[int] = []

    async def guarded() -> int:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def stop(signum: int) -> None:
            received.append(signum)
            task.cancel()

        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):  # not on Windows
                loop.add_signal_handler(signum, stop, signum)
        return await command(args)

    try:
        return asyncio.run(guarded())
    except (asyncio.CancelledError, KeyboardInterrupt):
        signum = received[0] if received else signal.SIGINT
        name = "interrupted" if signum == signal.SIGINT else "terminated"
        print(f"streamq: {name}", file=sys.stderr)
        return 128 + signum
    except (UsageError, StreamqError) as exc:
        print(f"streamq: error: {exc}", file=sys.stderr)
        return _exit_code(exc)
    except Exception as exc:
        if _is_server_problem(exc):
            print(f"streamq: error: {exc}", file=sys.stderr)
            return NO_SERVER
        if not isinstance(exc, redis.exceptions.RedisError | OSError):
            raise  # a bug: the traceback is the useful report
        # Errors of redis-py itself: converted at the one boundary.
        err = convert(exc, args.command)
        print(f"streamq: error: {err}", file=sys.stderr)
        return _exit_code(err)


def _is_server_problem(exc: BaseException) -> bool:
    from .._servers import ServerNotFoundError, ServerStartError, UnsupportedFeatureError

    return isinstance(exc, ServerNotFoundError | ServerStartError | UnsupportedFeatureError)
