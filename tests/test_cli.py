"""The ``ei`` command line: entry points, and clear errors (exit status 2, no traceback) that
name the bad key, file or path."""

from __future__ import annotations

import errno
import subprocess
import sys

import pytest

from ei.cli import main, resolve_config
from ei.data import ensure_synthetic_dataset
from ei.model.checkpoint import torch_load
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
    for command in ("train", "evaluate", "predict", "attention", "plan"):
        assert command in out


def test_every_command_has_help(capsys):
    for command in ("train", "evaluate", "predict", "attention", "plan"):
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
    _fails(["train", "single.epochs="], capsys, "single.epochs: no value after '='")


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
    _fails(["predict", str(untrained_run), "--annotations", str(tmp_path / "x.txt")], capsys,
           f"--annotations: no such file: {tmp_path / 'x.txt'}")
    (tmp_path / "x.txt").write_text("a.png\n")
    _fails(["predict", str(untrained_run), "--annotations", str(tmp_path / "x.txt")], capsys,
           str(untrained_run / "ei" / "best.pt"))
    _fails(["attention", str(untrained_run), "--out", str(tmp_path / "a"), "--stage", "nope"],
           capsys, "stage: 'nope' is not a stage of this run")


def test_a_device_that_does_not_exist_is_named():
    from ei.train.config import ConfigError
    from ei.train.distributed import pick_device

    assert pick_device("cpu", 0, "--device").type == "cpu"
    for bad in ("foo", "cpu:3", "cuda:x"):
        with pytest.raises(ConfigError, match=f"--device: expected auto, cpu, cuda or cuda:N, "
                                              f"got '{bad}'"):
            pick_device(bad, 0, "--device")


def test_damaged_checkpoints_are_one_line_errors_naming_the_file(capsys, untrained_run):
    import io

    import torch

    best = untrained_run / "ei" / "best.pt"
    best.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(64, 64)}, buffer)
    for content, why in ((b"\x80\x04garbage" * 64, "it is not a torch.save file"),
                         (buffer.getvalue()[:200], "damaged or cut short"),
                         (b"", "damaged or cut short")):
        best.write_bytes(content)
        _fails(["evaluate", str(untrained_run), "--stage", "ei"], capsys,
               "ei evaluate: error: ei checkpoint", why, str(best))
        assert "weights_only=False" not in capsys.readouterr().err
    # Damage anywhere in the archive (its central directory at the end included), or in a
    # legacy-format file: always CheckpointError naming the file, never another exception.
    from ei.model.checkpoint import CheckpointError, read_state_dict

    legacy = io.BytesIO()
    torch.save({"w": torch.ones(64, 64)}, legacy, _use_new_zipfile_serialization=False)
    for blob in (buffer.getvalue(), legacy.getvalue()):
        for at in range(0, len(blob), max(1, len(blob) // 97)):
            damaged = bytearray(blob)
            damaged[at:at + 8] = b"\xff" * len(damaged[at:at + 8])
            best.write_bytes(bytes(damaged))
            try:
                read_state_dict(best)
            except CheckpointError as err:
                assert str(best) in str(err)
    torch.save({"w": torch.ones(2)}, best)  # readable, but not this run's model
    _fails(["evaluate", str(untrained_run), "--stage", "ei"], capsys,
           f"ei checkpoint {best}: checkpoint does not fit: missing keys", "unexpected keys ['w']",
           "not this run's checkpoint?")


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


def test_config_errors_come_before_torch_is_imported():
    """A typo costs a fraction of a second, not the seconds torch and timm take to import."""
    code = ("import sys; from ei.cli import main; rc = main(['train', 'single.lrr=1']); "
            "assert rc == 2, rc; assert 'torch' not in sys.modules, 'torch imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "single.lrr: unknown key" in out.stderr


def test_synthetic_preset_never_writes_into_a_users_data(capsys, tmp_path, monkeypatch):
    """`ei train data.root=/my/data` without the dataset's config file: refused, untouched."""
    mine = tmp_path / "my_data"
    mine.mkdir()
    (mine / "train.txt").write_text("a.png,b.png\tMEL\n")
    monkeypatch.chdir(tmp_path)
    _fails(["train", f"data.root={mine}"], capsys, f"{mine} is not empty and was not made by",
           "give its config file")
    assert sorted(p.name for p in mine.iterdir()) == ["train.txt"]
    monkeypatch.setenv("EI_SYNTHETIC_DIR", str(mine))
    _fails(["train"], capsys, f"{mine} is not empty")
    assert sorted(p.name for p in mine.iterdir()) == ["train.txt"]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("override, message", [
    ("model.inject_layer=99", "model.inject_layer: the backbone has 1 blocks, so 0..1; got 99"),
    ("model.mor.ranks=[2,4,0]", "model.mor.ranks: expected positive integers"),
    ("model.mor.backend=bogus", "model.mor.backend: expected 'auto' or one of"),
    ("model.mor.targets=[nothing]", "model.mor.targets: no nn.Linear"),
    ("model.timm_kwargs={embed_dim: 30}", "model ("),
    ("model.adapter_hidden=0", "model.adapter_hidden: must be >= 1"),
    ("model.mor.alphas=[0,0,0]", "model.mor.alphas: expected finite numbers > 0"),
    ("loss.aux_weight=nan", "loss.aux_weight: must be a finite number >= 0"),
    ("loss.prior_low=2", "loss.prior_low: must be in [0, 1]"),
    ("seed=-1", "seed: must be an integer in [0, 2**32)"),
    ("model.timm_kwargs={embed_dim:32}", "model.timm_kwargs: 'embed_dim:32' is one key without"),
    ("data.synthetic.seed=-1", "data.synthetic.seed: must be an integer in [0, 2**32)"),
])
def test_model_settings_fail_before_a_run_directory_exists(capsys, tmp_path, data_root,
                                                           override, message):
    config = write_micro_config(tmp_path, data_root)
    _fails(["train", str(config), override, "--run-dir", str(tmp_path / "r")], capsys, message)
    assert not (tmp_path / "r").exists()


def test_a_checkpoint_of_another_model_fails_before_a_run_directory_exists(capsys, tmp_path,
                                                                            data_root):
    import torch

    from ei.model import BackboneConfig, SingleModalityModel

    # the micro backbone, but twice as wide: loaded on the meta device, refused by its shapes
    kwargs = {**MICRO["model"]["timm_kwargs"], "embed_dim": 64}
    wider = SingleModalityModel.build(BackboneConfig(name="tiny", img_size=16,
                                                     timm_kwargs=kwargs), 2)
    plain = {k: v for k, v in wider.backbone.vit.state_dict().items()
             if "lora_" not in k and "router_" not in k}  # a timm file has no MoR
    torch.save(plain, tmp_path / "wider.pt")
    config = write_micro_config(tmp_path, data_root)
    _fails(["train", str(config), f"model.checkpoint={tmp_path / 'wider.pt'}", "--run-dir",
            str(tmp_path / "r")], capsys, "model.checkpoint: checkpoint", "has shape")
    assert not (tmp_path / "r").exists()


def test_a_diverging_run_stops_and_keeps_its_last_good_epoch(capsys, tmp_path, data_root):
    """A nan loss stops the stage before the weights take it: no results from a diverged
    model, and last.pt holds the epoch before."""
    config = write_micro_config(tmp_path, data_root, single={"epochs": 3})
    _fails(["train", str(config), "single.lr=1e4", "--run-dir", str(tmp_path / "r")], capsys,
           "training diverged", "smaller single.lr")
    for best in (tmp_path / "r").glob("*/best.pt"):
        assert all(bool(t.isfinite().all()) for t in torch_load(best).values()
                   if t.is_floating_point())


def test_a_bundled_config_resolves_by_its_repository_path_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_config("configs/mrnet.yaml") == resolve_config("mrnet")


def test_a_failed_start_leaves_no_run_directory_behind(capsys, tmp_path, data_root):
    """An unreadable image is found when the datasets open, after the run directory exists:
    the directory goes again, and the same command works once the data is fixed."""
    broken = tmp_path / "data"
    broken.mkdir()
    for name in ("labels.json", "train.txt", "val.txt", "test.txt", "manifest.json"):
        (broken / name).write_bytes((data_root / name).read_bytes())
    (broken / "images").mkdir()
    for split in ("train", "val", "test"):
        (broken / "images" / split).symlink_to(data_root / "images" / split)
    first = (broken / "train.txt").read_text().splitlines()[0].split("\t")[0].split(",")[0]
    (broken / "images" / "train").unlink()
    (broken / "images" / "train").mkdir()
    for png in (data_root / "images" / "train").iterdir():
        (broken / "images" / "train" / png.name).symlink_to(png)
    (broken / first).unlink()
    (broken / first).write_bytes(b"not a png")
    config = write_micro_config(tmp_path, broken)
    _fails(["train", str(config), "--run-dir", str(tmp_path / "r")], capsys, first)
    assert not (tmp_path / "r").exists()


def test_one_process_trains_a_run_at_a_time(capsys, untrained_run):
    run = RunDir.open(untrained_run)
    with run.training_lock():
        _fails(["train", "--resume", str(untrained_run)], capsys,
               f"{untrained_run} is being trained right now by process")
        # evaluating meanwhile works on the checkpoints so far, and says so
        _fails(["evaluate", str(untrained_run)], capsys,
               f"note: {untrained_run} is being trained right now by process")
    assert run.trainer() is None
    assert (untrained_run / "config.yaml").is_file()  # a resumed run is never discarded


def test_unwritable_output_is_one_line(capsys, tmp_path, data_root, monkeypatch):
    config = write_micro_config(tmp_path, data_root)

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EROFS, "Read-only file system", str(tmp_path / "r"))

    monkeypatch.setattr(RunDir, "create", read_only)
    _fails(["train", str(config), "--run-dir", str(tmp_path / "r")], capsys,
           f"cannot write {tmp_path / 'r'}: Read-only file system")


def test_a_run_directory_that_cannot_exist_names_its_setting(capsys, tmp_path, data_root):
    config = write_micro_config(tmp_path, data_root)
    (tmp_path / "file").write_text("")  # a file where a folder would have to be
    _fails(["train", str(config), f"out_dir={tmp_path / 'file' / 'runs'}"], capsys,
           "ei train: error: out_dir: cannot create the run directory")
    _fails(["train", str(config), "--run-dir", str(tmp_path / "file" / "r")], capsys,
           "ei train: error: --run-dir: cannot create the run directory")


@pytest.mark.parametrize("argv", [
    ["attention", "RUN", "--out", "x", "--count", "0"],
    ["predict", "RUN", "--annotations", "a.txt", "--batch-size", "0"],
    ["predict", "RUN", "--annotations", "a.txt", "--batch-size", "many"],
])
def test_counts_on_the_command_line_must_be_positive(capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert "expected an integer >= 1" in capsys.readouterr().err


def test_plan_prints_the_memory_table(capsys, tmp_path, data_root):
    config = write_micro_config(tmp_path, data_root)
    assert main(["plan", str(config), "--gpu-memory", "1GB", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "largest batch in 1 GiB" in out and "| ei | bf16 | yes | 2 |" in out
    _fails(["plan", str(config), "--gpu-memory", "lots"], capsys, "--gpu-memory: expected")
    # reads no data: a preset's data.root is not needed; overrides may follow the options
    assert main(["plan", "mmc_amd", "--gpu-memory", "16GB", "data.image_size=224"]) == 0
    assert "(mmc-amd, 224 px;" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["plan", "mmc_amd", "--bogus"])
    assert "usage: ei plan" in capsys.readouterr().err
    _fails(["plan", str(config), "model.inject_layer=9"], capsys, "model.inject_layer")
