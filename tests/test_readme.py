"""Every ```python block of README.md runs, as written, against a fresh test server.

Each block is a complete program that reads ``REDIS_URL`` from the environment and
ends with ``asyncio.run(main())``; it runs in its own interpreter so that it sees
exactly what a user pasting it would.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MakeServer

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)


def python_blocks() -> list[tuple[int, str]]:
    """(line number, code) of every ```python block of the README."""
    text = README.read_text(encoding="utf-8") if README.exists() else ""
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in _BLOCK.finditer(text)]


BLOCKS = python_blocks()


def test_block_parser() -> None:
    sample = "x\n```python\nprint(1)\n```\n\n```console\n$ ls\n```\n```python\na = 2\n```\n"
    assert [m.group(1) for m in _BLOCK.finditer(sample)] == ["print(1)\n", "a = 2\n"]


@pytest.mark.skipif(not BLOCKS, reason="README.md has no ```python block yet")
@pytest.mark.parametrize(("line", "code"), BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_block_runs(make_server: MakeServer, tmp_path: Path, line: int, code: str) -> None:
    server = make_server()
    script = tmp_path / f"readme_line_{line}.py"
    script.write_text(code, encoding="utf-8")
    env = {**os.environ, "REDIS_URL": server.url}
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, (
        f"README.md block at line {line} exited with {proc.returncode}\n"
        f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    )
