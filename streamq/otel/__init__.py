"""OpenTelemetry tracing and metrics for streamq (``pip install 'streamq[otel]'``).

See :class:`Telemetry`. Only ``opentelemetry-api`` is needed here; the
application installs and configures an SDK (exporters, readers) as usual.
"""

try:
    import opentelemetry.metrics as _metrics  # noqa: F401 - fail early with a hint
    import opentelemetry.trace as _trace  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("streamq.otel needs OpenTelemetry: pip install 'streamq[otel]'") from exc

from ._telemetry import Telemetry as Telemetry
from ._telemetry import context_of as context_of

__all__ = ["Telemetry", "context_of"]
