"""The ``streamq`` command (also ``python -m streamq``).

Standard library only (argparse, no extra dependencies). Results go to stdout,
progress bars and errors to stderr, so ``--json`` output can be piped as is.
The exit codes are part of the interface (see :data:`EXIT_CODES`).

Modules: ``_output`` (formatting, :class:`~._output.Progress`), ``_run`` (exit
codes, the URL, connecting, errors to exit codes), ``_commands`` (``info``,
``pending``, ``dead``, ``replay``, ``trim``), ``_demo_bench`` (``demo`` and
``bench``), ``_bench_report`` (the benchmark's runs and report), ``_parser``
(:func:`build_parser`) and ``_main`` (:func:`main`, :func:`console_main`).
"""

from __future__ import annotations

from ._main import console_main, main
from ._parser import build_parser
from ._run import EXIT_CODES

__all__ = ["EXIT_CODES", "build_parser", "console_main", "main"]
