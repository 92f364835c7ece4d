"""Finding and loading the compiled CUDA extension (`ei_kernels._C`), lazily and safely.

`import ei_kernels` never needs the extension: the first call that asks for it tries the import
once and remembers the outcome, so `cuda_extension_info()` can say why it is missing.
"""

from __future__ import annotations

import functools
import importlib


@functools.lru_cache(maxsize=None)
def _load():
    try:
        module = importlib.import_module("ei_kernels._C")
    except ImportError as err:
        return None, f"ei_kernels._C could not be imported ({err}); build it with `pip install -e .`"
    return module, None


def cuda_extension_info() -> dict:
    """{"loaded": bool, "path": str | None, "reason": str | None} for the compiled extension."""
    module, reason = _load()
    return {
        "loaded": module is not None,
        "path": getattr(module, "__file__", None),
        "reason": reason,
    }
