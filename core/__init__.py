"""Outrider: a plugin-first L4/L7 proxy framework.

The public API for extension authors is re-exported here::

    from outrider import Extension, hookimpl, HttpFilter, HttpFilterFactory, STOP
"""

__version__ = "0.1.0"

from .context import BuildContext  # noqa: E402
from .hookspecs import hookimpl, hookspec  # noqa: E402
from .http.filter import CONTINUE, STOP, HttpFilter, HttpFilterFactory  # noqa: E402
from .http.message import Headers, RequestHead, ResponseHead  # noqa: E402
from .registry import CATEGORIES, Extension, Registry  # noqa: E402
from .stats import Counter, Gauge, Histogram, StatsGroup  # noqa: E402
from .upstream import Host  # noqa: E402

__all__ = [
    "__version__",
    "BuildContext",
    "CATEGORIES",
    "CONTINUE",
    "Counter",
    "Extension",
    "Gauge",
    "Headers",
    "Histogram",
    "Host",
    "HttpFilter",
    "HttpFilterFactory",
    "Registry",
    "RequestHead",
    "ResponseHead",
    "STOP",
    "StatsGroup",
    "hookimpl",
    "hookspec",
]
