"""Which files this process opens while a block runs (a Python audit hook, PEP 578).

The coordinator's process is the test's own in a simulation (each site runs in a Ray
actor), so what it opens is what the coordinator read: the check behind "the coordinator
never opens a site's secret" claims.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["opened_files"]

_OPENED: list[str] = []
_WATCH = {"on": False, "installed": False}


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _WATCH["on"] and event == "open" and isinstance(args[0], str | bytes | os.PathLike):
        _OPENED.append(os.fsdecode(args[0]))


@contextmanager
def opened_files() -> Iterator[list[str]]:
    """Yield a list that, once the block ends, holds every path the process opened in it.
    An audit hook cannot be removed, so one is installed once and switched on and off."""
    if not _WATCH["installed"]:
        sys.addaudithook(_audit)
        _WATCH["installed"] = True
    _OPENED.clear()
    seen: list[str] = []
    _WATCH["on"] = True
    try:
        yield seen
    finally:
        _WATCH["on"] = False
        seen.extend(_OPENED)
