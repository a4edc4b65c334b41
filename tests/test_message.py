"""Message: validation at construction, and the fields of received messages."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import pytest

from streamq import Message


def test_defaults_and_fields() -> None:
    msg = Message("orders", {"a": "x", "b": b"y", "c": 3, "d": 1.5})
    assert msg.stream == "orders"
    assert msg.id == "*"
    assert msg.values == {"a": "x", "b": b"y", "c": 3, "d": 1.5}
    # Never received: no delivery yet, and retry_count is never below 0.
    assert msg.deliveries == 0
    assert msg.retry_count == 0


def test_values_are_copied_into_a_dict() -> None:
    source = OrderedDict(a="1")
    msg = Message("s", source)
    source["b"] = "2"
    assert msg.values == {"a": "1"}
    assert type(msg.values) is dict


@pytest.mark.parametrize("entry_id", ["1-0", "1700000000000-5", "5", "12-*"])
def test_explicit_ids(entry_id: str) -> None:
    assert Message("s", {"a": 1}, id=entry_id).id == entry_id


def test_blank_id_means_star() -> None:
    assert Message("s", {"a": 1}, id="").id == "*"


@pytest.mark.parametrize("entry_id", ["abc", "1-", "-1", "1-2-3", "1.5", "*-1", " 1-0", "$"])
def test_malformed_id(entry_id: str) -> None:
    with pytest.raises(ValueError, match="id"):
        Message("s", {"a": 1}, id=entry_id)


@pytest.mark.parametrize(
    ("stream", "exc"),
    [("", ValueError), (None, TypeError), (b"s", TypeError), (3, TypeError)],
)
def test_stream_validation(stream: Any, exc: type[Exception]) -> None:
    with pytest.raises(exc, match="stream"):
        Message(stream, {"a": 1})


@pytest.mark.parametrize("value", [True, False, None, [1], {"x": 1}, object(), (1,)])
def test_unsupported_values(value: Any) -> None:
    # bool and None are refused: Redis would store text that does not round-trip.
    with pytest.raises(TypeError, match=r"values\['a'\]"):
        Message("s", {"a": value})


def test_empty_values() -> None:
    with pytest.raises(ValueError, match="values"):
        Message("s", {})


@pytest.mark.parametrize("values", [[("a", 1)], "a=1", None, 5])
def test_values_not_a_mapping(values: Any) -> None:
    with pytest.raises(TypeError, match="values"):
        Message("s", values)


@pytest.mark.parametrize(("name", "exc"), [(1, TypeError), (b"a", TypeError), ("", ValueError)])
def test_bad_field_names(name: Any, exc: type[Exception]) -> None:
    with pytest.raises(exc, match="values"):
        Message("s", {name: "v"})


def test_received_fields() -> None:
    first = Message._received("s", "1-0", {"a": b"1"}, 1)
    assert (first.deliveries, first.retry_count) == (1, 0)
    third = Message._received("s", "1-0", {"a": b"1"}, 3)
    assert (third.deliveries, third.retry_count) == (3, 2)
    # Read-only: the counter belongs to Redis.
    with pytest.raises(AttributeError):
        third.deliveries = 5  # type: ignore[misc]
    with pytest.raises(AttributeError):
        third.retry_count = 5  # type: ignore[misc]


def test_text() -> None:
    msg = Message._received("s", "1-0", {"a": "é".encode(), "n": 5}, 1)
    assert msg.text("a") == "é"
    assert msg.text("n") == "5"
    assert msg.text("missing", "dflt") == "dflt"
    with pytest.raises(KeyError):
        msg.text("missing")


def test_equality_and_repr() -> None:
    a = Message("s", {"a": 1}, id="1-0")
    b = Message("s", {"a": 1}, id="1-0")
    assert a == b
    assert a != Message("s", {"a": 2}, id="1-0")
    assert "s" in repr(a)
    assert "1-0" in repr(a)
    with pytest.raises(TypeError):
        hash(a)  # mutable: the publisher writes the ID back
