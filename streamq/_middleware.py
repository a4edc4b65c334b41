"""Hooks around handler calls and publishes (tracing, metrics, logging context)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeAlias

from ._message import Message
from ._result import Result

__all__ = ["CallNext", "HandlerMiddleware", "PublishMiddleware"]

CallNext: TypeAlias = Callable[[Message], Awaitable[Result]]
"""Runs the rest of the chain (and finally the handler) for a message."""

HandlerMiddleware: TypeAlias = Callable[[Message, CallNext], Awaitable[Result]]
"""``async def mw(msg, call_next) -> Result``: wraps one handler call.

It must return ``await call_next(msg)`` (or a result of its own) and let
exceptions propagate; streamq maps them to retries as for the handler itself.
"""

PublishMiddleware: TypeAlias = Callable[[Message], None]
"""``def mw(msg) -> None``: sees every message before it is sent and may add fields."""
