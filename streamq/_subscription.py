"""Subscriptions: the handlers a consumer calls for one stream, checked and wrapped."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias, runtime_checkable

from ._message import Message
from ._middleware import CallNext, HandlerMiddleware
from ._result import Result, success

__all__ = ["Handler", "HandlerFunc", "Subscription", "subscription"]

HandlerFunc: TypeAlias = Callable[[Message], Awaitable[Result | None]]
"""``async def handler(msg: Message) -> Result | None`` (``None`` means success)."""

_SUCCESS = success()


@runtime_checkable
class Handler(Protocol):
    """An object whose ``handle_event`` coroutine method handles messages."""

    async def handle_event(self, msg: Message) -> Result | None:
        """Handle one message; return a :class:`~streamq.Result` or ``None`` for success."""


@dataclass(slots=True)
class Subscription:
    """One subscribed stream and what handles its messages."""

    stream: str
    # The handler itself, or the middleware chain ending in it; may return None.
    call: HandlerFunc
    dead_letter: HandlerFunc | None
    # Highest ID read from this stream, where a vanished group is recreated.
    last_id: str | None = None


def subscription(
    stream: str,
    handler: HandlerFunc | Handler,
    dead_letter: HandlerFunc | Handler | None,
    middleware: tuple[HandlerMiddleware, ...],
) -> Subscription:
    """Check the handlers and wrap them in ``middleware``.

    Raises:
        TypeError: A handler is not a coroutine function (or object with one), or
            does not take exactly one argument.
    """
    # Without middleware the handler is called directly (one coroutine frame
    # less per message); the worker maps its None to success either way.
    fn = _adapt(handler, "handler")
    call = _chain(_as_result(fn), middleware) if middleware else fn
    dead = None
    if dead_letter is not None:
        dead_fn = _adapt(dead_letter, "dead_letter")
        dead = _chain(_as_result(dead_fn), middleware) if middleware else dead_fn
    return Subscription(stream=stream, call=call, dead_letter=dead)


def _adapt(handler: HandlerFunc | Handler, what: str) -> HandlerFunc:
    fn: Any = handler
    if not inspect.iscoroutinefunction(fn):
        method = getattr(handler, "handle_event", None)
        if method is not None and inspect.iscoroutinefunction(method):
            fn = method
        elif callable(handler) and inspect.iscoroutinefunction(
            getattr(handler, "__call__", None)  # noqa: B004 - async __call__ objects
        ):
            fn = handler
        else:
            raise TypeError(
                f"{what}: expected an async function (async def f(msg)) or an object with "
                f"an async handle_event(msg) method, got {handler!r}"
            )
    try:
        inspect.signature(fn).bind(object())
    except TypeError:
        raise TypeError(
            f"{what}: {handler!r} must accept exactly one argument (the message)"
        ) from None
    except ValueError:  # no signature available (some builtins): let calls tell
        pass
    return fn  # type: ignore[no-any-return]


def _as_result(fn: HandlerFunc) -> CallNext:
    async def call(msg: Message) -> Result:
        result = await fn(msg)
        if result is None:
            return _SUCCESS
        if not isinstance(result, Result):
            raise TypeError(
                f"handler returned {type(result).__name__}; expected a streamq.Result or None"
            )
        return result

    return call


def _chain(call: CallNext, middleware: Iterable[Any]) -> CallNext:
    for mw in reversed(tuple(middleware)):

        def wrap(m: Any = mw, inner: CallNext = call) -> CallNext:
            async def wrapped(msg: Message) -> Result:
                return await m(msg, inner)  # type: ignore[no-any-return]

            return wrapped

        call = wrap()
    return call
