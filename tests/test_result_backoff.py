"""Result and its builders (success/fail/discard), and the Backoff policy."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

from streamq import Backoff, Result, discard, fail, success

# -- Result ---------------------------------------------------------------------


def test_success() -> None:
    result = success()
    assert result == Result(retry=False, error=None, backoff=None)
    assert result.ok


def test_fail() -> None:
    err = ValueError("boom")
    result = fail(err)
    assert (result.retry, result.error, result.backoff) == (True, err, None)
    assert not result.ok
    assert fail(err, backoff=2.5).backoff == 2.5
    assert fail(err, backoff=0).backoff == 0


def test_fail_and_discard_accept_text() -> None:
    result = fail("no stock")
    assert isinstance(result.error, Exception)
    assert str(result.error) == "no stock"
    result = discard("bad input")
    assert (result.retry, str(result.error)) == (False, "bad input")


def test_discard() -> None:
    err = KeyError("k")
    result = discard(err)
    assert (result.retry, result.error, result.backoff) == (False, err, None)
    assert not result.ok


@pytest.mark.parametrize("error", [None, 3, b"x"])
def test_fail_needs_an_error(error: Any) -> None:
    with pytest.raises((TypeError, ValueError), match="error"):
        fail(error)


@pytest.mark.parametrize("backoff", [-1, math.nan, "1", True])
def test_fail_bad_backoff(backoff: Any) -> None:
    with pytest.raises(ValueError, match="backoff"):
        fail("x", backoff=backoff)


def test_result_is_frozen() -> None:
    result = fail("x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.retry = False  # type: ignore[misc]
    with pytest.raises(ValueError, match="error"):
        Result(retry=True)


# -- Backoff --------------------------------------------------------------------


def test_backoff_defaults() -> None:
    backoff = Backoff()
    assert (backoff.min, backoff.max, backoff.factor, backoff.jitter) == (0.1, 10.0, 2.0, False)


def test_for_attempt_grows_and_caps() -> None:
    backoff = Backoff(min=0.5, max=4.0, factor=2.0)
    assert [backoff.for_attempt(n) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert Backoff(min=1, max=100, factor=3).for_attempt(2) == 9


def test_for_attempt_zero_is_min() -> None:
    assert Backoff().for_attempt(0) == 0.1
    assert Backoff(min=0, max=5).for_attempt(10) == 0


def test_factor_one_is_constant() -> None:
    backoff = Backoff(min=0.3, max=9, factor=1)
    assert {backoff.for_attempt(n) for n in (0, 1, 50, 10**6)} == {0.3}


@pytest.mark.parametrize("attempt", [1_000, 10**6, 10**18])
def test_huge_attempts_do_not_overflow(attempt: int) -> None:
    assert Backoff().for_attempt(attempt) == 10.0
    assert Backoff(min=0.1, max=10, factor=1e6).for_attempt(attempt) == 10.0


def test_jitter_stays_within_bounds() -> None:
    backoff = Backoff(min=0.1, max=2.0, jitter=True)
    for attempt in range(12):
        ceiling = min(0.1 * 2**attempt, 2.0)
        waits = [backoff.for_attempt(attempt) for _ in range(200)]
        assert all(0.1 <= w <= ceiling for w in waits), attempt
        if attempt >= 3:
            assert len(set(waits)) > 1  # actually random
    assert backoff.for_attempt(0) == 0.1  # nothing to randomise between min and min


def test_negative_attempt() -> None:
    with pytest.raises(ValueError, match="attempt"):
        Backoff().for_attempt(-1)


@pytest.mark.parametrize(
    ("kwargs", "field", "exc"),
    [
        ({"min": -1}, "min", ValueError),
        ({"min": math.nan}, "min", ValueError),
        ({"min": math.inf}, "min", ValueError),
        ({"min": "1"}, "min", TypeError),
        ({"min": True}, "min", TypeError),
        ({"max": -1}, "max", ValueError),
        ({"max": math.nan}, "max", ValueError),
        ({"min": 5, "max": 1}, "max", ValueError),
        ({"factor": 0.5}, "factor", ValueError),
        ({"factor": math.nan}, "factor", ValueError),
        ({"factor": "2"}, "factor", TypeError),
    ],
)
def test_backoff_validation(kwargs: dict[str, Any], field: str, exc: type[Exception]) -> None:
    with pytest.raises(exc, match=field):
        Backoff(**kwargs)


def test_backoff_is_frozen_and_keyword_only() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Backoff().min = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        Backoff(0.1, 10)  # type: ignore[misc]
