"""Optional imports probed once: the kernels' packages are extras, never needed to import nam_mixers."""

from __future__ import annotations

import functools
import importlib


@functools.cache
def import_error(module: str) -> str | None:
    """None if `module` imports, else the reason it does not (cached: imports are not retried)."""
    try:
        importlib.import_module(module)
    except ImportError as e:  # a broken install raises ImportError too; say what it was
        return f"{type(e).__name__}: {e}"
    return None
