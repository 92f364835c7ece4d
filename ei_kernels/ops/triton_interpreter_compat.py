"""A narrow work-around for the Triton 3.6 interpreter under numpy >= 2.4 (CPU tests only).

Under TRITON_INTERPRET=1, triton < 3.7 turns an interpreted scalar into a Python int with
`int(handle.data)`, where the data is a one-element 1-D array. numpy 2.4 removed that
conversion, so every `range(0, K, BLOCK_K)` over a runtime argument fails with
"TypeError: only 0-dimensional arrays can be converted to Python scalars". Triton 3.7 fixed it
(`int(handle.data.squeeze())`); this applies the same fix to older interpreters, and nothing
when the kernels are compiled for a GPU or when the installed versions do not need it.
"""

from __future__ import annotations

import os


def _needs_fix() -> bool:
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    import numpy
    import triton

    def major_minor(version: str) -> tuple[int, int]:
        major, minor = version.split(".")[:2]
        return int(major), int("".join(c for c in minor if c.isdigit()) or 0)

    return major_minor(triton.__version__) < (3, 7) and major_minor(numpy.__version__) >= (2, 4)


def apply() -> None:
    """Patch the interpreter's tensor __index__ inside its own patch scope (restored with it)."""
    if not _needs_fix():
        return
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_ei_kernels_fix", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor._ei_kernels_fix = True
    interpreter._patch_lang_tensor = patch_lang_tensor
