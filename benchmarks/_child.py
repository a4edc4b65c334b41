"""Runs one benchmark case in this (fresh) process and prints ``RESULT <json>``.

Usage (by ``_common.run_child``): ``python _child.py '{"runner": "module:function",
"url": ..., "params": {...}, "loop": "asyncio" | "uvloop"}'``.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import sys


def main() -> None:
    spec = json.loads(sys.argv[1])
    module_name, func_name = spec["runner"].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    coro = func(spec["url"], **spec["params"])
    if spec.get("loop", "asyncio") == "uvloop":
        import uvloop

        result = uvloop.run(coro)
    else:
        result = asyncio.run(coro)
    out = result.as_dict()
    out["loop"] = spec.get("loop", "asyncio")
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
