"""Loading and validating Outrider's YAML configuration.

::

    from outrider.config import load_config, ConfigInvalid
    try:
        config = load_config("outrider.yaml", registry)
    except ConfigInvalid as exc:
        print(exc)            # every error, one per line: file:line:col: path: message

The returned config is plain data in the normalised shape described in
:mod:`outrider.config.validate`.
"""

from .loader import ConfigError, ConfigInvalid
from .units import parse_address, parse_duration
from .validate import CORE_SCHEMA, FORMAT_CHECKER, load_config, load_config_text, normalise

__all__ = [
    "CORE_SCHEMA",
    "ConfigError",
    "ConfigInvalid",
    "FORMAT_CHECKER",
    "load_config",
    "load_config_text",
    "normalise",
    "parse_address",
    "parse_duration",
]
