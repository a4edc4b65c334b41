"""The streamq error hierarchy.

Every error streamq raises or reports derives from :class:`StreamqError`::

    StreamqError
    ├── HandlerError              a handler returned fail()/discard() or timed out
    │   └── HandlerPanic          a handler raised an exception
    ├── DeadLetteredError         a message exhausted max_retry and was dead-lettered
    ├── MessageLostError          an entry was deleted (trimmed) before it was processed
    ├── MalformedMessageError     an entry streamq cannot turn into a Message
    ├── LeaseLostError            an ordered stream's lease expired under this consumer
    ├── NetworkError              connection refused/reset/timed out (``retrying`` tells
    │                             whether streamq will try again)
    ├── RedisError                any other error from Redis (WRONGTYPE, NOPERM, ...)
    │   ├── GroupRecreatedError   a consumer group or stream vanished and was recreated
    │   └── UnsupportedServerError  the server lacks a command streamq needs
    └── ClosedError               the consumer or publisher was used after aclose()

Errors from redis-py are converted to these at one place, :func:`convert`; nothing
else in streamq inspects redis-py exceptions. Every error carries ``message`` (the
:class:`~streamq.Message` concerned, or ``None``) and ``error`` (the underlying
cause, also set as ``__cause__``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import redis.exceptions as rex

if TYPE_CHECKING:
    from ._message import Message

__all__ = [
    "ClosedError",
    "DeadLetteredError",
    "GroupRecreatedError",
    "HandlerError",
    "HandlerPanic",
    "LeaseLostError",
    "MalformedMessageError",
    "MessageLostError",
    "NetworkError",
    "RedisError",
    "StreamqError",
    "UnsupportedServerError",
    "convert",
]


class StreamqError(Exception):
    """Root of every error streamq raises or reports.

    Attributes:
        message: The message this error concerns, if any.
        error: The underlying cause, if any (also ``__cause__``).
    """

    def __init__(
        self,
        description: str,
        *,
        message: Message | None = None,
        error: BaseException | None = None,
    ) -> None:
        super().__init__(description)
        self.message = message
        self.error = error
        if error is not None:
            self.__cause__ = error


class HandlerError(StreamqError):
    """A handler returned ``fail(...)`` or ``discard(...)``, or exceeded ``handler_timeout``.

    For a timeout, ``error`` is a :class:`TimeoutError`. ``retrying`` tells whether
    the message will be delivered again.
    """

    def __init__(
        self,
        description: str,
        *,
        message: Message | None = None,
        error: BaseException | None = None,
        retrying: bool = False,
    ) -> None:
        super().__init__(description, message=message, error=error)
        self.retrying = retrying


class HandlerPanic(HandlerError):
    """A handler raised an exception instead of returning a result.

    The exception is in ``error``; the message is retried like a ``fail()``.
    """


class DeadLetteredError(StreamqError):
    """A message exceeded ``max_retry`` and was dead-lettered.

    Attributes:
        dead_letter_stream: The stream it was appended to, or ``None`` when a
            dead-letter handler took it (or dead-lettering is set to drop).
    """

    def __init__(
        self,
        description: str,
        *,
        message: Message | None = None,
        error: BaseException | None = None,
        dead_letter_stream: str | None = None,
    ) -> None:
        super().__init__(description, message=message, error=error)
        self.dead_letter_stream = dead_letter_stream


class MessageLostError(StreamqError):
    """A pending entry was deleted from its stream (trimmed) before it was processed.

    Its ID is removed from the group's pending list; the data is gone. ``entry_id``
    and ``stream`` identify it.
    """

    def __init__(self, description: str, *, stream: str, entry_id: str) -> None:
        super().__init__(description)
        self.stream = stream
        self.entry_id = entry_id


class MalformedMessageError(StreamqError):
    """An entry could not be turned into a :class:`~streamq.Message`.

    The entry is not given to a handler; it is dead-lettered with its raw fields.
    """


class LeaseLostError(StreamqError):
    """The lease of an ordered stream expired while this consumer held it.

    Another consumer of the group may have taken the stream, so messages of one
    key may run twice or out of order. It happens when a consumer stalls for
    longer than ``pending_timeout``; reported, not raised.
    """


class NetworkError(StreamqError):
    """Redis could not be reached: connection refused, reset, or timed out.

    Attributes:
        retrying: Whether streamq will try the operation again.
        backoff: Seconds streamq waits before that retry (``None`` if not retrying).
    """

    def __init__(
        self,
        description: str,
        *,
        message: Message | None = None,
        error: BaseException | None = None,
        retrying: bool = False,
        backoff: float | None = None,
    ) -> None:
        super().__init__(description, message=message, error=error)
        self.retrying = retrying
        self.backoff = backoff


class RedisError(StreamqError):
    """Redis answered with an error that retrying cannot fix (WRONGTYPE, NOPERM, ...)."""


class GroupRecreatedError(RedisError):
    """A consumer group (or its stream) disappeared while in use and was recreated.

    Reported, not raised: consuming goes on.
    """


class UnsupportedServerError(RedisError):
    """The server lacks a command or feature that streamq needs."""


class ClosedError(StreamqError):
    """The consumer or publisher was used after ``aclose()``."""


# redis-py makes AuthenticationError a ConnectionError subclass; retrying a wrong
# password only hammers the server, so these are excluded from the network set.
_NOT_NETWORK: tuple[type[BaseException], ...] = (
    rex.AuthenticationError,
    rex.AuthorizationError,
    rex.AuthenticationWrongNumberOfArgsError,
)

# Errors that a later attempt can succeed after: the connection failed, the
# server is loading its data after a restart, or a failover is in progress.
NETWORK_ERRORS: tuple[type[BaseException], ...] = (
    rex.ConnectionError,  # includes BusyLoadingError (LOADING after a restart)
    rex.TimeoutError,
    rex.ReadOnlyError,  # a replica answering during failover
    rex.TryAgainError,
    rex.ClusterDownError,
    rex.MasterDownError,
    ConnectionError,  # the builtin: reset, refused, broken pipe
    TimeoutError,
)


def is_network_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a transient failure that a retry may cure."""
    if isinstance(exc, _NOT_NETWORK):
        return False
    if isinstance(exc, NetworkError):
        return True
    if isinstance(exc, rex.ConnectionError) and "Protocol Error" in str(exc):
        # A server that does not speak RESP: retrying will not change that.
        return False
    return isinstance(exc, NETWORK_ERRORS)


def is_nogroup(exc: BaseException) -> bool:
    """Whether ``exc`` is Redis' NOGROUP reply (group or stream missing).

    redis-py has no exception type for NOGROUP, so its reply prefix is the only
    reliable signal. A blocked ``XREADGROUP`` whose stream is deleted gets
    ``UNBLOCKED the stream key no longer exists`` instead: the same situation.
    """
    return isinstance(exc, rex.ResponseError) and str(exc).startswith(
        ("NOGROUP", "UNBLOCKED the stream key")
    )


def convert(exc: BaseException, what: str, *, message: Message | None = None) -> StreamqError:
    """Convert an exception from redis-py (or the socket layer) to a StreamqError.

    Args:
        exc: The exception to convert. A StreamqError is returned unchanged.
        what: What streamq was doing, for the error text (e.g. ``"XACK orders"``).
        message: The message concerned, if any.
    """
    if isinstance(exc, StreamqError):
        return exc
    if is_network_error(exc):
        return NetworkError(f"{what}: {type(exc).__name__}: {exc}", message=message, error=exc)
    if isinstance(exc, rex.InvalidResponse) or (
        isinstance(exc, rex.ConnectionError) and "Protocol Error" in str(exc)
    ):
        # What an HTTP, SSH or TLS endpoint, or a wrong port, answers.
        return RedisError(
            f"{what}: the reply is not the Redis protocol; is this a Redis server "
            f"(right host and port, rediss:// for TLS)? {type(exc).__name__}: {exc}",
            message=message,
            error=exc,
        )
    if isinstance(exc, rex.ResponseError) and "unknown command" in str(exc).lower():
        return UnsupportedServerError(
            f"{what}: the server does not support this command ({exc})",
            message=message,
            error=exc,
        )
    return RedisError(f"{what}: {type(exc).__name__}: {exc}", message=message, error=exc)
