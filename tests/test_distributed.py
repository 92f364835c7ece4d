"""Two processes with the gloo backend on CPU: the environment-variable initialisation torchrun
uses, DistributedDataParallel keeping the ranks' weights equal, only rank 0 writing, and a whole
``ei train`` under torchrun (NCCL where the machine has two GPUs)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

from ei.data import ensure_synthetic_dataset
from micro_run import MICRO, write_micro_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, config_path: str, out_dir: str) -> None:
    # What torchrun sets for each process.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from ei.train import checkpoint, distributed, loop
    from ei.train.config import load_config
    from ei.train.data import build_splits, make_loader
    from ei.train.loop import StageSpec, StageTrainer
    from ei.train.models import build_model, build_task

    if rank != 0:
        def forbidden(*args, **kwargs):
            raise AssertionError(f"rank {rank} wrote a file")

        for module, name in ((checkpoint, "atomic_save"), (checkpoint, "atomic_write_text"),
                             (loop, "plot_curves")):
            setattr(module, name, forbidden)

    config = load_config(config_path, ["single.epochs=1"])
    world = distributed.init("cpu")
    assert (world.rank, world.size) == (rank, 2) and torch.distributed.get_backend() == "gloo"
    splits = build_splits(config, world)
    stage = "single/locator"
    torch.manual_seed(rank)  # different initial weights per rank: DDP must make them equal
    model = build_model(config, splits.preset, stage)
    spec = StageSpec(stage, Path(out_dir) / "run" / "single" / "locator",
                     build_task(config, splits.preset, stage), config.single, world, "fp32",
                     progress=False)
    loader = make_loader(splits.train, config, 8, world, train=True, seed=0)
    val_loader = make_loader(splits.val, config, 8, world, train=False, seed=0)
    trainer = StageTrainer(spec, model, loader, val_loader, splits.class_names)
    # Each rank sees its own half of the training set.
    trainer.train_loader.sampler.set_epoch(0)
    shard = list(iter(trainer.train_loader.sampler))
    trainer.fit()
    torch.save({"state": model.state_dict(), "shard": shard},
               Path(out_dir) / f"rank{rank}.pt")
    distributed.shutdown(world)


def test_two_gloo_processes_agree_and_only_rank_0_writes(tmp_path):
    root = ensure_synthetic_dataset(tmp_path / "data", **MICRO["data"]["synthetic"])
    config = write_micro_config(tmp_path, root)
    mp.spawn(_worker, args=(_free_port(), str(config), str(tmp_path)), nprocs=2)

    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert not set(r0["shard"]) & set(r1["shard"])
    assert len(r0["shard"]) + len(r1["shard"]) == MICRO["data"]["synthetic"]["n_train"]
    for key, value in r0["state"].items():
        torch.testing.assert_close(r1["state"][key], value, rtol=0, atol=0, msg=key)
    written = tmp_path / "run" / "single" / "locator"
    assert sorted(p.name for p in written.iterdir()) == [
        "best.pt", "curves.png", "last.pt", "metrics.jsonl"]


def test_ei_train_under_torchrun(tmp_path):
    root = ensure_synthetic_dataset(tmp_path / "data", **MICRO["data"]["synthetic"])
    # With the demo's backbone pretraining (a token amount of it): rank 0 makes the weights
    # while rank 1 waits, then both load them. gloo on the CPU, unless there is a GPU per rank
    # (then NCCL, one GPU each).
    device = "auto" if torch.cuda.device_count() >= 2 else "cpu"
    config = write_micro_config(
        tmp_path, root, single={"epochs": 1}, ei={"epochs": 1}, data={"image_size": None},
        model={"synthetic_pretraining": {"images": 16, "epochs": 1, "batch_size": 8}},
        runtime={"device": device})
    run = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "ei.cli", "train", str(config), "--run-dir", str(run)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1",
             "EI_SYNTHETIC_DIR": str(tmp_path / "cache" / "synthetic")},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert len(list((tmp_path / "cache" / "pretrained").glob("*.pt"))) == 1
    # Rank 0 alone prints the table.
    assert out.stdout.count("Test results") == 1
    rows = json.loads((run / "summary.json").read_text())
    assert [r["stage"] for r in rows] == ["single/locator", "single/appearance", "ei", "late_fusion"]
    # The test metrics cover the whole split once, though each rank evaluated half of it.
    result = json.loads((run / "ei" / "result.json").read_text())
    assert result["test"]["num_samples"] == MICRO["data"]["synthetic"]["n_test"]
