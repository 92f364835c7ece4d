"""The ``ei`` command line: entry points, and clear errors (exit status 2, no traceback) that
name the bad key, file or path."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ei.cli import main, resolve_config
from ei.data import ensure_synthetic_dataset
from ei.train.config import load_config
from ei.train.rundir import RunDir
from micro_run import MICRO, write_micro_config


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return ensure_synthetic_dataset(tmp_path_factory.mktemp("data") / "synthetic",
                                    **MICRO["data"]["synthetic"])


@pytest.fixture
def untrained_run(tmp_path, data_root):
    """A run directory with its config but no trained stage."""
    config = load_config(write_micro_config(tmp_path, data_root))
    return RunDir.create(config, tmp_path / "run").path


def _fails(argv, capsys, *expected: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err, err


def test_module_entry_point_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "ei.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for command in ("train", "evaluate", "predict", "attention"):
        assert command in out


def test_every_command_has_help(capsys):
    for command in ("train", "evaluate", "predict", "attention"):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
        assert f"usage: ei {command}" in capsys.readouterr().out


def test_the_default_config_is_the_synthetic_demo():
    path = resolve_config(None)
    assert path.name == "synthetic.yaml"
    config = load_config(path)
    assert config.data.preset == "synthetic" and config.late_fusion
    # Pretrained on generic scenes here (a frozen random backbone leaves every model at chance).
    assert config.model.synthetic_pretraining is not None and not config.model.pretrained
    # Named configs resolve to configs/<name>.yaml.
    assert resolve_config("mrnet").name == "mrnet.yaml"


def test_bad_override_names_the_key(capsys):
    _fails(["train", "single.lrr=0.1"], capsys, "single.lrr: unknown key")
    _fails(["train", "ei.epochs=many"], capsys, "ei.epochs: expected an integer")


def test_unknown_config_file_is_named(capsys, tmp_path):
    _fails(["train", str(tmp_path / "mine.yaml")], capsys, "mine.yaml")


def test_malformed_annotation_line_names_file_and_line(capsys, tmp_path, data_root):
    lines = (data_root / "train.txt").read_text().splitlines()
    (data_root / "broken.txt").write_text(lines[0] + "\n" + lines[1].replace("\t", " ") + "\n")
    config = write_micro_config(tmp_path, data_root)
    _fails(["train", str(config), "data.train=broken.txt", "--run-dir", str(tmp_path / "r")],
           capsys, f"{data_root / 'broken.txt'}:2")


def test_missing_run_and_checkpoint_name_the_path(capsys, tmp_path, untrained_run):
    _fails(["evaluate", str(tmp_path / "nowhere")], capsys,
           f"run directory not found: {tmp_path / 'nowhere'}")
    _fails(["evaluate", str(tmp_path)], capsys, f"not a run directory (no config.yaml): {tmp_path}")
    _fails(["evaluate", str(untrained_run)], capsys, f"no trained model in {untrained_run}")
    _fails(["predict", str(untrained_run), "--annotations", "x.txt"], capsys,
           str(untrained_run / "ei" / "best.pt"))
    _fails(["attention", str(untrained_run), "--out", str(tmp_path / "a"), "--stage", "nope"],
           capsys, "stage: 'nope' is not a stage of this run")


def test_a_run_directory_is_never_overwritten(capsys, untrained_run):
    config = untrained_run / "config.yaml"
    _fails(["train", str(config), "--run-dir", str(untrained_run)], capsys,
           f"{untrained_run} already holds a run; continue it with --resume")


def test_resume_only_changes_runtime_settings(capsys, untrained_run):
    _fails(["train", "--resume", str(untrained_run), "single.lr=1"], capsys,
           "single.lr: cannot change when resuming")


def test_resume_takes_no_other_config(capsys, untrained_run):
    _fails(["train", "other.yaml", "--resume", str(untrained_run)], capsys,
           "--resume: the run has its own config")
