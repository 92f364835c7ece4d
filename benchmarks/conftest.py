"""Collects every benchmark record of the session; at the end writes them as JSON plus a
markdown table (machine, date, commit) under EI_BENCH_OUT and prints the table."""

import datetime
import json
import subprocess

import pytest

from .harness import bench_device, machine_name, out_dir, quick_mode
from .report import layer_table

_RECORDS: list[dict] = []


@pytest.fixture
def bench_results():
    return _RECORDS


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def pytest_terminal_summary(terminalreporter):
    layer = [r for r in _RECORDS if "provider" in r]
    if not _RECORDS:
        return
    device = bench_device()
    doc = {
        "machine": machine_name(device),
        "date": datetime.date.today().isoformat(),
        "commit": _commit(),
        "quick": quick_mode(),
        "records": _RECORDS,
    }
    folder = out_dir()
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"bench-{device.type}{'-quick' if quick_mode() else ''}"
    (folder / f"{stem}.json").write_text(json.dumps(doc, indent=1))
    table = f"## {doc['machine']} ({doc['date']}, commit {doc['commit']})\n\n"
    if layer:
        table += layer_table(layer) + "\n"
    (folder / f"{stem}.md").write_text(table)
    terminalreporter.write_sep("=", "ei-kernels benchmark")
    terminalreporter.write_line(table)
    terminalreporter.write_line(f"results written to {folder / stem}.json and .md")
