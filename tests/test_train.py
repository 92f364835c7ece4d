"""ei.train: configuration, schedule, atomic checkpoints, and a micro end-to-end run with
evaluate, predict and attention on its run directory."""

from __future__ import annotations

import csv
import errno
import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ei.data import ensure_synthetic_dataset
from ei.train import checkpoint
from ei.train.config import Config, ConfigError, load_config, save_config
from ei.train.schedule import IterationSchedule, lr_at
from micro_run import MICRO, write_micro_config


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    syn = MICRO["data"]["synthetic"]
    return ensure_synthetic_dataset(tmp_path_factory.mktemp("data") / "synthetic", **syn)


# -- configuration -------------------------------------------------------------------------


def test_defaults_are_the_reference_settings():
    c = Config()
    assert (c.single.lr, c.single.momentum, c.single.weight_decay, c.single.batch_size) == (
        1e-3, 0.95, 1e-4, 8)
    assert (c.single.epochs, c.single.warmup_epochs, c.single.min_lr, c.single.patience) == (
        50, 1.0, 1e-7, 10)
    assert (c.loss.aux_weight, c.loss.gate_weight, c.loss.prior_low) == (0.3, 0.1, 1e-3)
    assert c.model.mor.targets == ("fc1", "fc2") and c.model.inject_layer == 0


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    # 1e-3 without a dot is a string in YAML 1.1: it must still be read as a number.
    path.write_text("single: {lr: 1e-3, epochs: 3}\nmodel: {mor: {targets: [fc1]}}\n")
    c = load_config(path, ["single.epochs=5", "ei.lr=0.5", "model.inject_layer=null",
                           "model.mor.ranks=[2,4]", "model.mor.alphas=[4,8]",
                           "model.timm_kwargs={depth: 2}"])
    assert c.single.lr == 1e-3 and c.single.epochs == 5 and c.ei.lr == 0.5
    assert c.model.inject_layer is None and c.model.mor.targets == ("fc1",)
    assert c.model.mor.ranks == (2, 4) and c.model.timm_kwargs == {"depth": 2}


def test_saved_config_loads_back_equal(tmp_path):
    c = load_config(None, ["single.epochs=7", "model.mor.targets=[qkv,fc1]", "data.image_size=16"])
    save_config(c, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == c


@pytest.mark.parametrize("override, key", [
    ("single.lrr=1", "single.lrr"),
    ("single.lr=fast", "single.lr"),
    ("single.lr=-1", "single.lr"),
    ("single.epochs=2.5", "single.epochs"),
    ("ei.batch_size=0", "ei.batch_size"),
    ("runtime.precision=fp8", "runtime.precision"),
    ("runtime.device=tpu", "runtime.device"),
    ("model.backbone=no_such_vit", "model.backbone"),
    ("model.mor.mode=adapter", "model.mor.mode"),
    ("model.mor.ranks=4", "model.mor.ranks"),
    ("model.mor.ranks=[2,4,0]", "model.mor.ranks"),
    ("model.mor.ranks=[2,4]", "model.mor.alphas"),
    ("model.mor.alphas=[1,2,.nan]", "model.mor.alphas"),
    ("model.mor.targets=[]", "model.mor.targets"),
    ("data.root=' '", "data.root"),
    ("data.preset=imagenet", "data.preset"),
    ("data.preset=derm7pt", "data.root"),
    ("loss.best_modality=oct", "loss.best_modality"),
    ("late_fusion=maybe", "late_fusion"),
    ("single=3", "single"),
    ("single.lr.x=1", "single.lr"),
])
def test_bad_keys_and_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}\b"):
        load_config(None, [override])


def test_bad_files_name_the_path(tmp_path):
    with pytest.raises(ConfigError, match="nothere.yaml"):
        load_config(tmp_path / "nothere.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("single: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["single.epochs"])


# -- schedule ------------------------------------------------------------------------------


def test_schedule_warms_up_linearly_then_follows_the_cosine():
    base, floor, warmup, total = 0.1, 1e-7, 10, 111
    lrs = [lr_at(i, base, floor, warmup, total) for i in range(total + 5)]
    assert lrs[0] == pytest.approx(base / warmup)
    assert lrs[4] == pytest.approx(base * 5 / warmup)
    assert lrs[warmup - 1] == pytest.approx(base) and lrs[warmup] == pytest.approx(base)
    middle = warmup + (total - 1 - warmup) // 2
    assert lrs[middle] == pytest.approx((base + floor) / 2, rel=1e-3)
    assert lrs[total - 1] == pytest.approx(floor) and lrs[total + 4] == pytest.approx(floor)
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))


@pytest.mark.parametrize("half_cycle", [None, 4], ids=["warmup_cosine", "cyclic"])
def test_scheduler_state_resumes_the_same_curve(half_cycle):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0, momentum=0.5)
    s = IterationSchedule(opt, 0.1, 0.0, warmup=3, total=20, half_cycle=half_cycle)
    for _ in range(7):
        s.step()
    opt2 = torch.optim.SGD([p], lr=1.0, momentum=0.5)
    s2 = IterationSchedule(opt2, 0.1, 0.0, warmup=3, total=20, half_cycle=half_cycle)
    s2.load_state_dict(s.state_dict())
    assert opt2.param_groups[0] == {**opt.param_groups[0], "params": opt2.param_groups[0]["params"]}
    if half_cycle is None:
        assert opt.param_groups[0]["lr"] == lr_at(7, 0.1, 0.0, 3, 20)


def test_cyclic_schedule_by_hand():
    # Floor 1e-5, peak 1e-3, 4 iterations up and 4 down, peaks shrinking by 0.8 per cycle.
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0, momentum=0.95)
    s = IterationSchedule(opt, 1e-3, 1e-5, half_cycle=4, decay=0.8)
    lrs, momenta = [], []
    for _ in range(17):
        lrs.append(opt.param_groups[0]["lr"])
        momenta.append(opt.param_groups[0]["momentum"])
        s.step()
    span = 1e-3 - 1e-5
    assert lrs[0] == pytest.approx(1e-5) and momenta[0] == pytest.approx(0.9)
    assert lrs[2] == pytest.approx(1e-5 + span / 2) and momenta[2] == pytest.approx(0.85)
    assert lrs[4] == pytest.approx(1e-3) and momenta[4] == pytest.approx(0.8)
    assert lrs[6] == pytest.approx(1e-5 + span / 2)
    assert lrs[8] == pytest.approx(1e-5) and momenta[8] == pytest.approx(0.9)
    assert lrs[12] == pytest.approx(1e-5 + 0.8 * span)  # the second peak
    assert momenta[12] == pytest.approx(0.9 - 0.8 * 0.1)
    assert lrs[16] == pytest.approx(1e-5)


def test_cyclic_schedule_follows_torchs_cyclic_lr_as_the_authors_configure_it():
    # Their setting: CyclicLR(base_lr=1e-5, max_lr=1e-3, step_size_up=4 * interval,
    # scale_fn=lambda c: 0.8 ** (c - 1)) on SGD, momentum cycled by CyclicLR's defaults.
    interval = 7
    params = [torch.nn.Parameter(torch.zeros(1))]
    theirs = torch.optim.SGD(params, lr=1e-5, momentum=0.95)
    reference = torch.optim.lr_scheduler.CyclicLR(
        theirs, base_lr=1e-5, max_lr=1e-3, step_size_up=4 * interval,
        scale_fn=lambda c: 0.8 ** (c - 1))
    ours = torch.optim.SGD(params, lr=1.0, momentum=0.95)
    s = IterationSchedule(ours, 1e-3, 1e-5, half_cycle=4 * interval, decay=0.8)
    for _ in range(3 * 8 * interval + 5):
        for key in ("lr", "momentum"):
            assert ours.param_groups[0][key] == pytest.approx(theirs.param_groups[0][key],
                                                              rel=1e-9, abs=1e-15)
        theirs.step()
        reference.step()
        s.step()


# -- checkpoints ---------------------------------------------------------------------------


def test_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.atomic_save({"epoch": 1, "w": torch.ones(3)}, path)

    def dies_half_way(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.atomic_save({"epoch": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    state = checkpoint.load(path)
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file left


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 123 vs 45"),
], ids=["ENOSPC", "torch-inline-container"])
def test_full_disk_is_said_plainly(tmp_path, monkeypatch, failure):
    def full(obj, f, *args, **kwargs):
        raise failure

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(
        10 << 30, 10 << 30, 1 << 20))
    with pytest.raises(OSError, match=r"no space left on the device of .* while writing last.pt"):
        checkpoint.atomic_save({"w": torch.ones(3)}, tmp_path / "last.pt")
    assert list(tmp_path.iterdir()) == []


def test_checkpoints_follow_the_umask_like_every_other_file(tmp_path):
    checkpoint.atomic_save({"w": torch.ones(3)}, tmp_path / "last.pt")
    checkpoint.atomic_write_text("{}", tmp_path / "result.json")
    (tmp_path / "plain.txt").write_text("x")
    plain = (tmp_path / "plain.txt").stat().st_mode & 0o777
    assert (tmp_path / "last.pt").stat().st_mode & 0o777 == plain
    assert (tmp_path / "result.json").stat().st_mode & 0o777 == plain


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope.pt")):
        checkpoint.load(tmp_path / "nope.pt")


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    checkpoint.atomic_save({"rng": checkpoint.rng_state()}, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    checkpoint.set_rng_state(checkpoint.load(tmp_path / "rng.pt")["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2] == expected[2]


# -- end to end ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory, data_root):
    from ei.cli import main

    tmp = tmp_path_factory.mktemp("run")
    config = write_micro_config(tmp, data_root)
    assert main(["train", str(config), "--run-dir", str(tmp / "run")]) == 0
    return tmp / "run"


def test_training_writes_every_stage(micro_run, capsys):
    stages = ["single/locator", "single/appearance", "ei", "late_fusion"]
    for stage in stages:
        d = micro_run.joinpath(*stage.split("/"))
        for name in ("last.pt", "best.pt", "metrics.jsonl", "curves.png", "result.json"):
            assert (d / name).is_file(), d / name
        records = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in records] == [1, 2]
        assert all(math.isfinite(r["train_loss"]) for r in records)
    rows = json.loads((micro_run / "summary.json").read_text())
    assert [r["stage"] for r in rows] == stages
    assert all(0 <= r["test_mAP"] <= 1 and 0 <= r["test_accuracy"] <= 1 for r in rows)
    # The loss prior goes to the single model with the best training-set mAP (docs/EI_SPEC.md).
    train_maps = {m: json.loads((micro_run / "single" / m / "result.json").read_text())["train_mAP"]
                  for m in ("locator", "appearance")}
    ei_result = json.loads((micro_run / "ei" / "result.json").read_text())
    assert ei_result["best_modality"] == max(train_maps, key=train_maps.get)


def test_evaluate_prints_and_writes_per_class_metrics(micro_run, capsys):
    from ei.cli import main

    assert main(["evaluate", str(micro_run), "--split", "test", "--stage", "ei"]) == 0
    out = capsys.readouterr().out
    assert "EI on test (12 samples)" in out and "overall" in out
    with open(micro_run / "eval" / "ei_test.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == ["horizontal", "vertical", "checker", "solid", "overall"]
    assert set(rows[0]) >= {"ap", "auc", "sensitivity", "specificity", "f1", "accuracy"}
    summary = json.loads((micro_run / "summary.json").read_text())
    ei_row = next(r for r in summary if r["stage"] == "ei")
    assert float(rows[-1]["ap"]) == pytest.approx(ei_row["test_mAP"])


def test_evaluate_says_which_stages_it_leaves_out(micro_run, tmp_path, capsys):
    import shutil

    from ei.cli import main

    run = tmp_path / "run"
    shutil.copytree(micro_run, run)
    for stage in ("ei", "late_fusion"):
        (run / stage / "best.pt").unlink()
    assert main(["evaluate", str(run), "--out", str(tmp_path / "eval")]) == 0
    out = capsys.readouterr().out
    assert "Not evaluated (no best.pt yet): ei, late_fusion" in out
    assert "EI on test" not in out and "on test (12 samples)" in out


def test_resuming_a_finished_run_says_so_and_trains_nothing(micro_run, tmp_path, capsys):
    import shutil

    from ei.cli import main

    run = tmp_path / "run"
    shutil.copytree(micro_run, run)
    before = (run / "ei" / "best.pt").stat().st_mtime_ns
    assert main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    for stage in ("single/locator", "single/appearance", "ei", "late_fusion"):
        assert f"{stage}: already trained" in out
    assert (run / "ei" / "best.pt").stat().st_mtime_ns == before


def test_predict_writes_probabilities_for_unlabelled_lines(micro_run, data_root, tmp_path):
    from ei.cli import main

    lines = (data_root / "test.txt").read_text().splitlines()[:5]
    unlabelled = tmp_path / "new.txt"
    # an empty label field, or the paths alone
    unlabelled.write_text("".join(line.split("\t")[0] + ("\t\n" if i < 3 else "\n")
                                  for i, line in enumerate(lines)))
    out = tmp_path / "p.csv"
    assert main(["predict", str(micro_run), "--annotations", str(unlabelled), "--root",
                 str(data_root), "--out", str(out)]) == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 and all(r["labels"] == "" for r in rows)
    probs = np.array([[float(r[f"p_{c}"]) for c in ("horizontal", "vertical", "checker", "solid")]
                      for r in rows])
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_predict_takes_the_classes_from_the_run_not_from_beside_the_data(micro_run, data_root,
                                                                        tmp_path, capsys):
    from ei.cli import main

    assert json.loads((micro_run / "classes.json").read_text()) == [
        "horizontal", "vertical", "checker", "solid"]
    lines = (data_root / "test.txt").read_text().splitlines()[:3]
    # Unlabelled data in a folder without labels.json: the run's classes are enough.
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "images").symlink_to(data_root / "images")
    (bare / "new.txt").write_text("".join(line.split("\t")[0] + "\t\n" for line in lines))
    assert main(["predict", str(micro_run), "--annotations", str(bare / "new.txt"), "--root",
                 str(bare), "--out", str(tmp_path / "p.csv")]) == 0
    # A label map beside the data that orders the classes otherwise would swap the columns.
    (bare / "labels.json").write_text(json.dumps(
        {"vertical": 0, "horizontal": 1, "checker": 2, "solid": 3}))
    assert main(["predict", str(micro_run), "--annotations", str(bare / "new.txt"), "--root",
                 str(bare), "--out", str(tmp_path / "q.csv")]) == 2
    err = capsys.readouterr().err
    assert f"{bare / 'labels.json'} gives the classes as ['vertical', 'horizontal'" in err
    assert "outputs would be mislabeled" in err and not (tmp_path / "q.csv").exists()


def test_attention_overlays_exist(micro_run, tmp_path):
    from ei.cli import main

    assert main(["attention", str(micro_run), "--out", str(tmp_path / "att"), "--count", "2"]) == 0
    pngs = sorted((tmp_path / "att").glob("*.png"))
    assert len(pngs) == 2 and all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)


@pytest.mark.parametrize("capability, expected", [
    ((7, 5), "fp16"),  # T4: no bf16 tensor cores (torch would call emulated bf16 supported)
    ((7, 0), "fp16"),  # V100
    ((8, 0), "bf16"),  # A100
    ((8, 6), "bf16"),  # A10, RTX 30xx
    ((9, 0), "bf16"),  # H100, H200
])
def test_auto_precision_fits_the_card(monkeypatch, capability, expected):
    from ei.train.inference import resolve_precision

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert resolve_precision("auto", torch.device("cuda:0")) == expected


def test_fp16_trains_with_the_gradient_scaler(tmp_path, data_root):
    """The path `precision: auto` takes on pre-Ampere GPUs (T4, V100), run on the CPU: fp16
    autocast, the loss scaled, the scaler's state checkpointed with the rest."""
    from ei.cli import main

    config = write_micro_config(tmp_path, data_root, runtime={"precision": "fp16"},
                                late_fusion=False)
    assert main(["train", str(config), "--run-dir", str(tmp_path / "run")]) == 0
    for stage in ("single/locator", "ei"):
        state = checkpoint.load(tmp_path.joinpath("run", *stage.split("/"), "last.pt"), "last")
        assert state["scaler"]["scale"] > 0 and state["scaler"]["_growth_tracker"] >= 0
        history = json.loads(state["history"])
        assert all(math.isfinite(h["train_loss"]) for h in history)


def test_precision_and_activation_checkpointing_options():
    from ei.data import get_preset
    from ei.train.inference import resolve_precision
    from ei.train.models import build_model

    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    assert resolve_precision("fp16", cpu) == "fp16"
    config = load_config(None, ["model.backbone=tiny", "model.pretrained=false",
                                "model.grad_checkpointing=true", "data.image_size=16"])
    model = build_model(config, get_preset("synthetic"), "single/locator")
    assert model.backbone.vit.grad_checkpointing


def test_dataset_configs_follow_the_authors_where_they_fix_a_choice():
    from ei.train.data import resolve_preset

    amd = load_config(Path(__file__).resolve().parents[1] / "configs" / "mmc_amd.yaml",
                      ["data.root=/data"])
    assert resolve_preset(amd).pick_sorted and amd.loss.best_modality == "oct"
    assert not resolve_preset(load_config(None)).pick_sorted
    with pytest.raises(ConfigError, match="protocol.eval_pick: expected one of"):
        load_config(None, ["protocol.eval_pick=last"])
