"""The ``minigun`` logger (API.md: its warnings, and at DEBUG each fork and exit).

``logging`` and what it loads (traceback, linecache, tokenize, string) are about a sixth
of what ``import minigun`` would cost, and most runs log nothing, so the module is
imported when the first record is logged. Asking whether DEBUG is on never imports it: a
process that has not imported ``logging`` cannot have set the ``minigun`` logger's level.
"""

from __future__ import annotations

import sys
from typing import Any

NAME = "minigun"


def debug_enabled() -> bool:
    """Whether the ``minigun`` logger records DEBUG messages (``python -m minigun -v``)."""
    logging = sys.modules.get("logging")
    return logging is not None and logging.getLogger(NAME).isEnabledFor(logging.DEBUG)


def debug(message: str, *args: Any) -> None:
    _logger().debug(message, *args)


def warning(message: str, *args: Any) -> None:
    _logger().warning(message, *args)


def _logger() -> Any:
    import logging  # noqa: PLC0415 - imported on first use (see the module docstring)

    return logging.getLogger(NAME)
