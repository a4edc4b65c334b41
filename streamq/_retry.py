"""Network retries: the single retry layer of streamq, driven by tenacity."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt
from tenacity.stop import stop_never

from ._backoff import Backoff
from ._errors import NetworkError, StreamqError, convert, is_network_error

if TYPE_CHECKING:
    from ._message import Message

__all__ = ["NetworkRetry"]

T = TypeVar("T")


class NetworkRetry:
    """Runs Redis operations, retrying network failures with backoff.

    The first attempt runs without tenacity so that the common, successful case
    costs nothing; only a failure builds the retry loop. Cancellation is never
    retried: only the exception types of :func:`~streamq._errors.is_network_error`
    are (tenacity's ``retry_if_exception`` never sees ``CancelledError``, which is
    not an ``Exception``).

    Args:
        backoff: Wait policy: retry ``n`` (0-based) waits ``backoff.for_attempt(n)``.
        retries: Retries after the first attempt; ``< 0`` forever, ``0`` never.
        report: Called with a ``NetworkError(retrying=True)`` before each wait.
    """

    def __init__(
        self, backoff: Backoff, retries: int, report: Callable[[StreamqError], None]
    ) -> None:
        self._backoff = backoff
        self._retries = retries
        self._report = report

    async def call(
        self,
        what: str,
        fn: Callable[..., Awaitable[T]],
        *args: Any,
        message: Message | None = None,
    ) -> T:
        """Run ``fn(*args)``, retrying network errors.

        Args:
            what: What is being done, for error texts (``"XACK orders"``).
            fn: Makes one attempt when called with ``args``.
            args: Arguments for ``fn``.
            message: The message concerned, attached to reported errors.

        Raises:
            NetworkError: Retries are exhausted (``retrying`` is False).
            RedisError: Redis answered with an error that retrying cannot fix.
        """
        try:
            return await fn(*args)
        except Exception as exc:
            if not is_network_error(exc) or self._retries == 0:
                err = convert(exc, what, message=message)
                if err is exc:
                    raise
                raise err from exc
            first: Exception | None = exc

        async def attempt() -> T:
            nonlocal first
            if first is not None:
                # Replays the failure that happened outside tenacity, so that its
                # bookkeeping (attempt numbers, waits) starts from the right place.
                exc, first = first, None
                raise exc
            return await fn(*args)

        def before_sleep(state: RetryCallState) -> None:
            outcome = state.outcome
            cause = outcome.exception() if outcome is not None else None
            wait = state.upcoming_sleep
            self._report(
                NetworkError(
                    f"{what}: {type(cause).__name__}: {cause}; retrying in {wait:.3g} s "
                    f"(attempt {state.attempt_number})",
                    message=message,
                    error=cause,
                    retrying=True,
                    backoff=wait,
                )
            )

        retrying = AsyncRetrying(
            stop=stop_never if self._retries < 0 else stop_after_attempt(self._retries + 1),
            wait=lambda state: self._backoff.for_attempt(state.attempt_number - 1),
            retry=retry_if_exception(is_network_error),
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            return await retrying(attempt)
        except Exception as exc:
            err = convert(exc, what, message=message)
            if isinstance(err, NetworkError):
                err.retrying = False
                err.backoff = None
            if err is exc:
                raise
            raise err from exc
