"""Small constant tensors that the kernels read (branch tables), built once per key and device.

Built with device fills only (no host-to-device copy, which a CUDA graph capture would refuse),
and cached only in plain eager runs:
- the fills of a tensor made while a CUDA graph is being captured run only when that graph is
  replayed, so reusing it elsewhere would read memory that was never written;
- under a fake or other dispatch mode (`ei plan`'s FakeTensorMode, tracing) a cached real tensor
  must not be used and a fake one must not be kept.
"""

from __future__ import annotations

from typing import Callable, Hashable

import torch
from torch._guards import detect_fake_mode
from torch.utils._python_dispatch import _get_current_dispatch_mode

_CACHE: dict[Hashable, object] = {}


def cached(key: Hashable, device: torch.device, build: Callable[[], object]):
    """build() (tensors on `device`) the first time for (key, device); the same objects after."""
    if detect_fake_mode() is not None or _get_current_dispatch_mode() is not None:
        return build()
    full_key = (key, device)
    found = _CACHE.get(full_key)
    if found is not None:
        return found
    value = build()
    if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        _CACHE[full_key] = value
    return value
