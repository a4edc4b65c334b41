"""The entry points of the ``streamq`` command: :func:`main` and :func:`console_main`.

:func:`main` parses the arguments, checks the URL of the commands that need one
and runs the command, returning its exit code (tests call it directly).
:func:`console_main` is the console script (and ``python -m streamq``): it exits
with that code and treats a closed stdout (``streamq dead orders | head``) as
success.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from typing import NoReturn

from ._parser import build_parser
from ._run import OK, USAGE, UsageError, _run, _url

__all__ = ["console_main", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``streamq`` command on ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return USAGE
    if args.command != "demo" and args.command != "bench":
        try:
            _url(args)
        except UsageError as exc:
            print(f"streamq: error: {exc}", file=sys.stderr)
            return USAGE
    code: int = _run(args, args.handler)
    return code


def console_main() -> NoReturn:
    """Entry point of the ``streamq`` console script."""
    with _quiet_broken_pipe():
        code = main()
    sys.exit(code)


@contextlib.contextmanager
def _quiet_broken_pipe() -> Iterator[None]:
    # `streamq dead orders | head` closes stdout early; that is not an error.
    try:
        yield
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(OK)
