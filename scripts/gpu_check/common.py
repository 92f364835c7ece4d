"""What the stages of scripts/gpu_check.sh share: where results go, the dry mode, JSON lines
written one at a time (so a killed stage keeps every finished case), and a per-case watchdog.

Environment (set by gpu_check.sh):
    OUT             folder of the result files
    GPU_CHECK_DRY   1: the same stages on the CPU with tiny shapes (Triton under the interpreter)
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]
# The package from the checkout even if its pip install failed; tests/ for the reference.
for _path in (ROOT, ROOT / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402

DRY = os.environ.get("GPU_CHECK_DRY", "0") == "1"
OUT = Path(os.environ.get("OUT", ROOT / "gpu_check_out"))

# Exit status of a stage whose CUDA context is broken (an illegal access poisons every later
# call): gpu_check.sh starts it again, and the new process skips the cases already recorded.
CONTEXT_LOST = 3


def device() -> torch.device:
    return torch.device("cpu" if DRY else "cuda")


def append(filename: str, record: dict) -> None:
    """One JSON line, flushed at once."""
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / filename, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_records(filename: str) -> list[dict]:
    """Every complete JSON line of a results file (a line cut by a kill is ignored)."""
    path = OUT / filename
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def context_lost(err: BaseException) -> bool:
    """Whether `err` leaves the CUDA context unusable for the rest of the process."""
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(err, accelerator_error):
        return True
    text = str(err)
    return any(s in text for s in ("CUDA error", "illegal memory access",
                                   "unspecified launch failure", "device-side assert"))


def short_error(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:1500]


class Watchdog:
    """Ends the process if one case runs longer than `seconds` (a hung kernel blocks in C, where
    no Python signal handler runs; faulthandler's thread still does). The case was recorded as
    started, so the restarted stage skips it and reports it as hung."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __enter__(self):
        faulthandler.dump_traceback_later(self.seconds, exit=True)
        return self

    def __exit__(self, *exc):
        faulthandler.cancel_dump_traceback_later()
        return False


def run_case(filename: str, base: dict, work: Callable[[], dict], seconds: float,
             started: dict | None = None, failed: dict | None = None) -> tuple[dict, bool]:
    """One case of a stage: `base` recorded as `started` ({"started": true} by default), then
    `work()` under a watchdog of `seconds`, then `base` with its result (or with `failed` and
    the error) and the seconds it took. Returns (result, whether the CUDA context is lost)."""
    append(filename, {**base, **(started or {"started": True})})
    t0 = time.perf_counter()
    lost = False
    try:
        with Watchdog(seconds):
            result = work()
    except Exception as err:  # one broken case must not stop the others
        result = {**(failed or {}), "error": short_error(err)}
        lost = context_lost(err)
        if lost:
            result["context_lost"] = True
    result["seconds"] = round(time.perf_counter() - t0, 3)
    append(filename, {**base, **result})
    return result, lost


def synchronize() -> None:
    if not DRY:
        torch.cuda.synchronize()
