"""What a handler returns: success, fail (retry) or discard (give up)."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Result", "discard", "fail", "success"]


@dataclass(frozen=True, slots=True)
class Result:
    """The outcome of handling one message.

    Build it with :func:`success`, :func:`fail` or :func:`discard` rather than directly.

    Attributes:
        retry: Deliver the message again later (it is not acknowledged).
        error: Why handling did not succeed; ``None`` means success.
        backoff: Seconds to wait before the retry, overriding the consumer's
            backoff policy for this one retry (``None``: use the policy).
    """

    retry: bool = False
    error: BaseException | None = None
    backoff: float | None = None

    def __post_init__(self) -> None:
        if self.retry and self.error is None:
            raise ValueError("error: a result that asks for a retry needs an error")
        if self.backoff is not None and (
            not isinstance(self.backoff, int | float)
            or isinstance(self.backoff, bool)
            or math.isnan(self.backoff)
            or self.backoff < 0
        ):
            raise ValueError(f"backoff: must be seconds >= 0 or None, got {self.backoff!r}")

    @property
    def ok(self) -> bool:
        """Whether this result is a success."""
        return self.error is None


_SUCCESS = Result()


def _as_exception(error: BaseException | str) -> BaseException:
    if isinstance(error, BaseException):
        return error
    if isinstance(error, str):
        return Exception(error)
    raise TypeError(f"error: expected an exception or a str, got {type(error).__name__}")


def success() -> Result:
    """The message was handled: acknowledge it."""
    return _SUCCESS


def fail(error: BaseException | str, *, backoff: float | None = None) -> Result:
    """Handling failed and should be retried later.

    The message is not acknowledged; it is delivered again after ``backoff``
    seconds (or the consumer's backoff policy), until ``max_retry`` is exhausted,
    then it is dead-lettered.

    Args:
        error: Why it failed (an exception, or a text that becomes one).
        backoff: Seconds to wait before this retry instead of the policy's value.
    """
    return Result(retry=True, error=_as_exception(error), backoff=backoff)


def discard(error: BaseException | str) -> Result:
    """Handling failed and must not be retried: acknowledge the message and report ``error``."""
    return Result(retry=False, error=_as_exception(error))
