"""Exponential backoff policy, used for handler retries and network retries."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

__all__ = ["Backoff"]


def _check_seconds(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name}: expected seconds as a float, got {type(value).__name__}")
    if math.isnan(value) or math.isinf(value) or value < 0:
        raise ValueError(f"{name}: must be finite seconds >= 0, got {value!r}")
    return float(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class Backoff:
    """Exponential backoff: ``min * factor**attempt`` seconds, capped at ``max``.

    Args:
        min: Wait before the first retry, in seconds.
        max: Longest wait, in seconds.
        factor: Growth per attempt (>= 1).
        jitter: Randomise each wait uniformly between ``min`` and the computed value,
            so that many consumers failing together do not retry in lockstep.
    """

    min: float = 0.1
    max: float = 10.0
    factor: float = 2.0
    jitter: bool = False

    def __post_init__(self) -> None:
        _check_seconds("min", self.min)
        _check_seconds("max", self.max)
        if isinstance(self.factor, bool) or not isinstance(self.factor, int | float):
            raise TypeError(f"factor: expected a number, got {type(self.factor).__name__}")
        if math.isnan(self.factor) or math.isinf(self.factor) or self.factor < 1:
            raise ValueError(f"factor: must be a finite number >= 1, got {self.factor!r}")
        if self.max < self.min:
            raise ValueError(f"max: {self.max!r} is below min {self.min!r}")

    def for_attempt(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based).

        ``for_attempt(0) == min`` (without jitter), growing by ``factor`` per attempt,
        never above ``max``.
        """
        if attempt < 0:
            raise ValueError(f"attempt: must be >= 0, got {attempt}")
        # Comparing exponents avoids float overflow for large attempt numbers.
        if self.min == 0:
            value = 0.0
        elif self.factor == 1 or attempt * math.log(self.factor) < math.log(self.max / self.min):
            value = min(self.min * self.factor**attempt, self.max)
        else:
            value = self.max
        if self.jitter and value > self.min:
            value = random.uniform(self.min, value)
        return value
