"""Structured payloads as JSON in one field of the flat field map.

A stream entry stays a flat map of fields: the codec only puts the payload, as
JSON, into one of them (``"payload"`` by default), next to any plain fields the
application adds (routing keys, tenant IDs, trace context). Readers that do not
use the codec still see ordinary text. Nothing is ever pickled: decoding a
payload runs no code from the stream.

Dataclasses are encoded field by field and rebuilt (nested dataclasses too);
pydantic models (and, when pydantic is installed, any type it can validate) go
through pydantic's own JSON support. pydantic is optional and imported lazily.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import types
import typing
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar, cast, overload

from ._errors import MalformedMessageError
from ._message import FieldValue, Message
from ._result import Result

__all__ = ["JsonCodec"]

T = TypeVar("T")

_MISSING = object()


def _pydantic_model(cls: object) -> bool:
    """Whether ``cls`` is a pydantic (v2) model class, without importing pydantic."""
    if "pydantic" not in sys.modules or not isinstance(cls, type):
        return False
    from pydantic import BaseModel

    return issubclass(cls, BaseModel)


def _pydantic_instance(obj: object) -> bool:
    return _pydantic_model(type(obj))


@functools.lru_cache(maxsize=256)
def _type_adapter(tp: Any) -> Any | None:
    try:
        from pydantic import TypeAdapter
    except ImportError:
        return None
    return TypeAdapter(tp)


def _build(tp: Any, value: Any) -> Any:
    """Rebuild dataclasses (nested, in lists/dicts/optionals) from decoded JSON."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise TypeError(f"expected a JSON object for {tp.__name__}, got {type(value).__name__}")
        hints = typing.get_type_hints(tp)
        kwargs = {}
        for f in dataclasses.fields(tp):
            if f.name in value:
                kwargs[f.name] = _build(hints.get(f.name, Any), value[f.name])
        unknown = set(value) - {f.name for f in dataclasses.fields(tp)}
        if unknown:
            raise TypeError(f"unexpected field(s) for {tp.__name__}: {', '.join(sorted(unknown))}")
        return tp(**kwargs)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (list, tuple, set, frozenset) and args and isinstance(value, list):
        item = args[0]
        built = [_build(item, v) for v in value]
        return built if origin is list else origin(built)
    if origin is dict and len(args) == 2 and isinstance(value, dict):
        return {k: _build(args[1], v) for k, v in value.items()}
    if origin in (typing.Union, types.UnionType) and value is not None:
        for candidate in args:
            if candidate is type(None):
                continue
            if dataclasses.is_dataclass(candidate) and not isinstance(value, dict):
                continue
            return _build(candidate, value)
    return value


class JsonCodec(Generic[T]):
    """Encodes structured payloads as JSON into one message field, and back.

    Example::

        @dataclass
        class Order:
            id: str
            amount: float

        orders = JsonCodec(Order)
        await publisher.publish(orders.message("orders", Order("A-1", 9.5), tenant="eu"))

        async def handle(msg: Message) -> None:
            order = orders.decode(msg)      # an Order again
            tenant = msg.text("tenant")     # plain fields still work

        consumer.subscribe("orders", orders.handler(process_order))

    Args:
        model: What :meth:`decode` returns: a dataclass, a pydantic model, any type
            pydantic can validate (when it is installed), or ``None`` (default) for
            plain JSON values (dicts, lists, strings, numbers).
        field: The field holding the JSON (default ``"payload"``).
        default: Passed to :func:`json.dumps` for values it cannot encode (e.g.
            ``str`` for datetimes); not used for pydantic models.

    Raises:
        ValueError: ``field`` is empty.
    """

    @overload
    def __init__(
        self: JsonCodec[Any],
        model: None = None,
        *,
        field: str = "payload",
        default: Callable[[Any], Any] | None = None,
    ) -> None: ...
    @overload
    def __init__(
        self,
        model: type[T],
        *,
        field: str = "payload",
        default: Callable[[Any], Any] | None = None,
    ) -> None: ...
    def __init__(
        self,
        model: type[T] | None = None,
        *,
        field: str = "payload",
        default: Callable[[Any], Any] | None = None,
    ) -> None:
        if not isinstance(field, str) or not field:
            raise ValueError("field: must be a non-empty str")
        self.model = model
        self.field = field
        self._default = default

    def encode(self, payload: Any) -> str:
        """Return ``payload`` as compact JSON text.

        Raises:
            TypeError: ``payload`` (or something inside it) is not JSON-serialisable.
        """
        if _pydantic_instance(payload):
            return cast(str, payload.model_dump_json())
        if dataclasses.is_dataclass(payload) and not isinstance(payload, type):
            payload = dataclasses.asdict(payload)
        try:
            return json.dumps(
                payload,
                ensure_ascii=False,
                separators=(",", ":"),
                allow_nan=False,
                default=self._default,
            )
        except ValueError as exc:  # NaN/inf: not JSON, other readers would choke
            raise TypeError(f"payload is not JSON-serialisable: {exc}") from exc

    def fields(self, payload: Any, /, **extra: FieldValue) -> dict[str, FieldValue]:
        """The field map for ``payload``: the JSON field plus ``extra`` plain fields.

        Raises:
            TypeError: ``payload`` is not JSON-serialisable.
            ValueError: ``extra`` contains the codec's own field.
        """
        if self.field in extra:
            raise ValueError(f"extra: {self.field!r} is the codec's payload field")
        return {self.field: self.encode(payload), **extra}

    def message(self, stream: str, payload: Any, /, **extra: FieldValue) -> Message:
        """A :class:`~streamq.Message` for ``stream`` carrying ``payload`` (and ``extra`` fields).

        Raises:
            TypeError: ``payload`` is not JSON-serialisable.
            ValueError: ``stream`` is empty or ``extra`` uses the codec's field.
        """
        return Message(stream, self.fields(payload, **extra))

    def decode(self, msg: Message) -> T:
        """Return the payload of a received message, as the codec's ``model``.

        Raises:
            MalformedMessageError: The field is missing, is not JSON, or does not fit
                the type. Raised from a handler it makes the message retry and, after
                ``max_retry``, land in the dead-letter stream with the reason; it is
                never silently dropped.
        """
        target = self.model
        raw = msg.values.get(self.field, _MISSING)
        if raw is _MISSING:
            raise MalformedMessageError(
                f"message {msg.id} of {msg.stream!r} has no {self.field!r} field", message=msg
            )
        try:
            text = raw.decode("utf-8", "strict") if isinstance(raw, bytes) else str(raw)
            return cast(T, self._parse(text, target))
        except Exception as exc:  # any parse or validation failure means a bad payload
            raise MalformedMessageError(
                f"message {msg.id} of {msg.stream!r}: field {self.field!r} does not hold "
                f"{_describe(target)}: {type(exc).__name__}: {exc}",
                message=msg,
                error=exc,
            ) from exc

    def _parse(self, text: str, target: Any) -> Any:
        if target is None or target is Any:
            return json.loads(text)
        if _pydantic_model(target):
            return target.model_validate_json(text)
        # Dataclasses are rebuilt by streamq itself, so the result does not depend on
        # whether pydantic happens to be installed.
        if dataclasses.is_dataclass(target):
            return _build(target, json.loads(text))
        adapter = _type_adapter(target)
        if adapter is not None:
            return adapter.validate_json(text)
        return _build(target, json.loads(text))

    def handler(
        self, fn: Callable[[T, Message], Awaitable[Result | None]]
    ) -> Callable[[Message], Awaitable[Result | None]]:
        """Adapt ``async def fn(payload, msg)`` into a streamq handler.

        A payload that cannot be decoded raises :class:`~streamq.MalformedMessageError`
        out of the handler: the message is retried like any failure and finally
        dead-lettered with the reason, never lost.
        """

        async def handle(msg: Message) -> Result | None:
            return await fn(self.decode(msg), msg)

        # Not functools.wraps: its __wrapped__ would make the consumer check fn's
        # two-argument signature instead of this one-argument handler's.
        handle.__name__ = getattr(fn, "__name__", handle.__name__)
        handle.__qualname__ = getattr(fn, "__qualname__", handle.__qualname__)
        handle.__doc__ = fn.__doc__
        return handle

    def __repr__(self) -> str:
        return f"JsonCodec({_describe(self.model)}, field={self.field!r})"


def _describe(target: Any) -> str:
    if target is None:
        return "JSON"
    return getattr(target, "__name__", repr(target))
