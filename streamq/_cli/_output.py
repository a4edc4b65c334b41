"""Output helpers of the ``streamq`` command: plain-text formatting and the progress bar.

Numbers, durations, timestamps and byte strings as the commands print them,
``key  value`` rows and aligned tables, JSON on stdout for ``--json``, URLs with
their password redacted for messages, and :class:`Progress`, the one-line
progress bar the long commands draw on stderr. Standard library only; nothing
here knows about Redis or the commands.
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "Progress",
    "_num",
    "_print_json",
    "_print_rows",
    "_redact",
    "_seconds",
    "_show",
    "_table",
    "_when",
]


def _redact(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for messages)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def _num(value: float | int | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.1f}"


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


def _table(rows: Sequence[Sequence[object]], headers: Sequence[str], indent: str = "") -> str:
    """A plain-text table: numbers right-aligned, text left-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [
        all(isinstance(row[i], int | float) for row in rows) and bool(rows)
        for i in range(len(headers))
    ]
    lines = []
    for r in cells:
        parts = [c.rjust(widths[i]) if numeric[i] else c.ljust(widths[i]) for i, c in enumerate(r)]
        lines.append(indent + "  ".join(parts).rstrip())
    return "\n".join(lines)


def _show(value: bytes, limit: int = 60) -> str:
    text = value.decode("utf-8", "backslashreplace")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _when(unix: float | None) -> str:
    if unix is None:
        return "-"
    return datetime.datetime.fromtimestamp(unix, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _print_rows(rows: Sequence[tuple[str, str]], indent: str = "") -> None:
    """``key  value`` lines, the values aligned."""
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{indent}{key.ljust(width)}  {value}")


def _print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


class Progress:
    """A one-line progress bar on stderr.

    Drawn only when stderr is a terminal (``mode="auto"``) or always
    (``"always"``), and in auto mode only once the work has taken longer than
    ``delay`` seconds, so quick commands print no bar at all.
    """

    def __init__(
        self,
        label: str,
        *,
        mode: str = "auto",
        delay: float = 0.5,
        out: TextIO | None = None,
        width: int = 28,
    ) -> None:
        self.out = out if out is not None else sys.stderr
        self.label = label
        self.enabled = mode == "always" or (mode == "auto" and self.out.isatty())
        self.delay = 0.0 if mode == "always" else delay
        self.width = width
        self.started = time.monotonic()
        self._last_draw = 0.0
        self._drawn = False
        self._line_len = 0

    def update(self, done: int, total: int | None, note: str = "", *, force: bool = False) -> None:
        """Redraw (at most ten times a second) with ``done`` of ``total`` (``None``: unknown)."""
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.started < self.delay and not force:
            return
        if not force and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        elapsed = max(now - self.started, 1e-9)
        rate = done / elapsed
        if total:
            frac = min(done / total, 1.0)
            filled = int(frac * self.width)
            bar = "#" * filled + "-" * (self.width - filled)
            eta = (total - done) / rate if rate > 0 and done < total else 0.0
            text = (
                f"{self.label} [{bar}] {done:,}/{total:,} {frac:4.0%}  "
                f"{rate:,.0f}/s  {elapsed:4.1f}s" + (f"  eta {eta:.0f}s" if done < total else "")
            )
        else:
            spin = "|/-\\"[int(elapsed * 8) % 4]
            text = f"{self.label} {spin} {done:,}  {elapsed:4.1f}s"
        if note:
            text += f"  {note}"
        pad = max(self._line_len - len(text), 0)
        self.out.write("\r" + text + " " * pad)
        self.out.flush()
        self._line_len = len(text)
        self._drawn = True

    def close(self) -> None:
        """End the bar's line (if one was drawn)."""
        if self._drawn:
            self.out.write("\n")
            self.out.flush()
            self._drawn = False
