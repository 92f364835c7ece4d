"""Flags that the programs of one Triton launch signal each other with, never zeroed per launch.

A flag counts as set in a launch when it holds that launch's epoch, a number no earlier launch
on the buffer used: so a launch needs no memset first (a launch of its own, about as long as a
small layer's whole forward at ViT-B sizes). Each (device, stream) has its own buffer, since
launches on one stream run one after the other and launches on two streams may overlap. While
a CUDA graph is being captured, a launch gets a fresh zeroed buffer and epoch 1 instead: the
zeroing is captured with it, so every replay starts from clean flags, and the graph never
shares a buffer with eager launches. Flags that one launch leaves for the next (the backward's
marks for its slot sum) stay valid because both are enqueued inside one `reserved` block,
which no other host thread's launch can enter.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch import Tensor

_EPOCH_LIMIT = 2**31 - 1  # the kernels take the epoch as an int32
_lock = threading.RLock()  # held while a reserved block enqueues its launches
_buffers: dict[tuple, list] = {}  # (device, stream) -> [int32 buffer, last epoch]


def _stream_key(device: torch.device) -> tuple:
    if device.type != "cuda":
        return (device.type,)
    return (device.type, device.index, torch.cuda.current_stream(device).stream_id)


@contextlib.contextmanager
def reserved(device: torch.device, count: int):
    """(int32 buffer of at least `count` flags on `device`, this launch's epoch), reserved until
    the block ends: enqueue there every launch that reads them (the backward's slot sum reads
    the marks its kernel left), so that no other host thread's launch on the stream comes
    between them and overwrites them."""
    count = max(1, count)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        yield torch.zeros(count, dtype=torch.int32, device=device), 1
        return
    key = _stream_key(device)
    with _lock:
        yield _next(key, device, count)


def _next(key: tuple, device: torch.device, count: int) -> tuple[Tensor, int]:
    """The stream's buffer, grown to `count` if need be, and the next epoch (lock held)."""
    entry = _buffers.get(key)
    if entry is None or entry[0].numel() < count or entry[1] >= _EPOCH_LIMIT:
        # New flags are zero, below every epoch; a bigger buffer is at least twice as big so
        # that growing layers reallocate a few times only. Epochs go on rising (from 0 again
        # only when they run out, with the new buffer).
        size = max(count, 2 * entry[0].numel()) if entry is not None else count
        epoch = entry[1] if entry is not None and entry[1] < _EPOCH_LIMIT else 0
        entry = [torch.zeros(size, dtype=torch.int32, device=device), epoch]
        _buffers[key] = entry
    entry[1] += 1
    return entry[0], entry[1]
