"""Closing a part at shutdown without letting its failure stop the rest of the shutdown."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("bridge.runtime")


def close_logged(label: str, closable: Any) -> None:
    """`closable.close()`; an exception is logged with `label` and goes no further."""
    try:
        closable.close()
    except Exception:
        log.exception("closing %s failed", label)
