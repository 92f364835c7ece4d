"""Machine facts for facts.json: GPU, driver, versions, commit. Never fails: what cannot be read
is recorded as the error that reading it gave."""

from __future__ import annotations

import json
import os
import platform
import subprocess

from common import DRY, OUT, ROOT

import torch  # noqa: E402


def _run(*cmd: str) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=ROOT)
        return (out.stdout or out.stderr).strip()
    except (OSError, subprocess.SubprocessError) as err:
        return f"unavailable: {err}"


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception as err:  # a broken install is a fact too
        return f"unavailable: {type(err).__name__}: {err}"


def facts() -> dict:
    info = {
        "dry": DRY,
        "date": _run("date", "-u", "+%Y-%m-%d %H:%M UTC"),
        "commit": os.environ.get("GPU_CHECK_COMMIT") or _run("git", "rev-parse", "--short",
                                                               "HEAD"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "timm": _version("timm"),
        "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name, gpu_count=torch.cuda.device_count(),
            capability=".".join(map(str, torch.cuda.get_device_capability(0))),
            sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2 ** 30, 1),
            driver=_run("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"),
            nvcc=_run("nvcc", "--version").splitlines()[-1:],
            host_compiler=_run("c++", "--version").splitlines()[:1],
        )
    else:
        info["gpu"] = "none"
    return info


if __name__ == "__main__":
    record = facts()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "facts.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record))
