"""A run killed with SIGKILL (in stage one, then again in stage two) and resumed with
``ei train --resume`` ends exactly where an uninterrupted run does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ei.data import ensure_synthetic_dataset
from micro_run import MICRO, write_micro_config

# Three epochs per stage, so that each kill below lands with work left in its stage.
EPOCHS = {"single": {"epochs": 3, "batch_size": 8, "lr": 0.01},
          "ei": {"epochs": 3, "batch_size": 8, "lr": 0.01}}


def _train(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "ei.cli", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill_when(process: subprocess.Popen, path: Path, timeout: float = 120.0) -> None:
    """SIGKILL `process` as soon as `path` exists (a checkpoint of the stage being trained)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(f"run ended before {path} appeared:\n{process.stdout.read()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"{path} did not appear in {timeout} s")
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL


def _finish(process: subprocess.Popen) -> str:
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out
    return out


@pytest.mark.parametrize("validation", ["epoch", "interval"])
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, validation):
    root = ensure_synthetic_dataset(tmp_path / "data", **MICRO["data"]["synthetic"])
    config = write_micro_config(tmp_path, root, protocol={"validation": validation}, **EPOCHS)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    # The two runs go side by side: the uninterrupted one is the reference.
    reference = _train(str(config), "--run-dir", str(straight))

    _kill_when(_train(str(config), "--run-dir", str(killed)),
               killed / "single" / "locator" / "last.pt")
    _kill_when(_train("--resume", str(killed)), killed / "ei" / "last.pt")
    out = _finish(_train("--resume", str(killed)))
    assert "ei: resumed after epoch" in out
    _finish(reference)

    assert (json.loads((killed / "summary.json").read_text())
            == json.loads((straight / "summary.json").read_text()))
    for stage in ("single/locator", "ei", "late_fusion"):
        a = torch.load(straight.joinpath(*stage.split("/"), "best.pt"), weights_only=True)
        b = torch.load(killed.joinpath(*stage.split("/"), "best.pt"), weights_only=True)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=f"{stage}: {key}")
    # The logs have one line per epoch: nothing repeated by the resumed epochs.
    for stage in ("single/locator", "ei"):
        lines = killed.joinpath(*stage.split("/"), "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


def test_resume_of_a_missing_run_names_the_path(tmp_path, capsys):
    from ei.cli import main

    assert main(["train", "--resume", str(tmp_path / "gone")]) == 2
    assert f"run directory not found: {tmp_path / 'gone'}" in capsys.readouterr().err
