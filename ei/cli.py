"""The ``ei`` command: train, evaluate, predict, attention, plan.

    ei train                                # the demonstration on the bundled synthetic data
    ei train configs/derm7pt.yaml data.root=/data/derm7pt data.splits=EI/datasplit
    ei train --resume runs/synthetic-20260101-120000
    torchrun --nproc_per_node 4 -m ei.cli train configs/mrnet.yaml data.root=/data/mrnet \\
        data.splits=EI/datasplit
    ei evaluate RUN [--split test] [--stage ei]
    ei predict RUN --annotations FILE [--out probs.csv]
    ei attention RUN --out DIR [--count 8]
    ei plan configs/mmc_amd.yaml --gpu-memory 16GB     # memory per step, largest batch
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_CONFIG = "synthetic"


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def describe_os_error(err: OSError) -> str:
    """One line for a failed file operation: what happened, to which path."""
    if err.errno == errno.ENOSPC and err.filename and "no space left" in str(err.strerror):
        return str(err.strerror)  # ours (ei.train.checkpoint): already says where and how much
    if err.errno == errno.ENOSPC:
        return f"no space left on the device while writing {err.filename or 'a file'}"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"cannot write {err.filename}: {err.strerror} (a read-only or someone else's "
                f"directory? choose another with --run-dir, out_dir=... or --out)")
    if err.strerror and err.filename:
        return f"{err.strerror}: {err.filename}"
    return str(err)


def resolve_config(name: str | None) -> Path:
    """A YAML path, or the name of a file in the repository's configs/ folder."""
    from ei.train.config import ConfigError

    name = name or DEFAULT_CONFIG
    path = Path(name)
    if path.is_file():
        return path
    # a bundled config by name, or by its path in the repository (the README's
    # `configs/derm7pt.yaml`, typed in another directory)
    for bundled in (CONFIG_DIR / f"{name}.yaml", CONFIG_DIR.parent / path):
        if not path.is_absolute() and bundled.is_file():
            return bundled
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config {name!r}: no such file, nor a bundled config "
                      f"(in {CONFIG_DIR}: {', '.join(known) or 'none'})")


def _split_items(items: list[str]) -> tuple[str | None, list[str]]:
    """The optional config (the one item without '=') and the key=value overrides."""
    from ei.train.config import ConfigError

    configs = [i for i in items if "=" not in i]
    if len(configs) > 1:
        raise ConfigError(f"expected one config file and key=value overrides, got {configs}")
    return (configs[0] if configs else None), [i for i in items if "=" in i]


def _resume_config(run, overrides: list[str]):
    """A run's own config; only runtime settings may change when it is resumed."""
    from ei.train.config import Config, ConfigError, apply_overrides, from_dict, read_run_config

    fixed = [o for o in overrides if not o.startswith("runtime.")]
    if fixed:
        raise ConfigError(f"{fixed[0].partition('=')[0]}: cannot change when resuming "
                          f"(only runtime.* settings can); start a new run instead")
    return from_dict(Config, apply_overrides(read_run_config(run.config_path), overrides))


def cmd_train(args: argparse.Namespace) -> None:
    from ei.train.config import ConfigError, load_config
    from ei.train.rundir import RunDir

    config_name, overrides = _split_items(args.items)
    if args.resume and (config_name or args.run_dir):
        raise ConfigError("--resume: the run has its own config and directory; give no config "
                          "file or --run-dir with it")
    run = RunDir.open(args.resume) if args.resume else None
    if run is not None:
        config = _resume_config(run, overrides)
    else:
        config = load_config(resolve_config(config_name), overrides)
    from ei.train.preflight import check_data_files, check_models

    check_data_files(config)
    # torch and timm only now: a config or data-path error above comes within a second.
    from ei.train import distributed
    from ei.train.pipeline import format_summary, train_all

    check_models(config)  # all before a run directory exists or any data is read
    world = distributed.init(config.runtime.device)
    new_run = run is None
    try:
        if new_run:
            # Rank 0 names and creates the directory; the others take its choice.
            run = RunDir.create(config, args.run_dir) if world.is_main else None
            run = distributed.all_gather_objects(run, world)[0]
        with run.training_lock() if world.is_main else contextlib.nullcontext():
            if world.is_main:
                print(f"Run directory: {run.path}", flush=True)
            results = train_all(config, run, world)
        if world.is_main:
            test_size = results[next(iter(results))]["test"]["num_samples"]
            print(f"\nTest results ({config.data.preset}, {test_size} samples, best checkpoint "
                  f"of each model by validation mAP):")
            print(format_summary(results))
            print(f"\nRun directory: {run.path}")
    except BaseException as err:
        if run is not None and world.is_main:
            if new_run and run.discard_if_untrained():
                print(f"(nothing was trained: {run.path} removed again)", file=sys.stderr)
            elif isinstance(err, KeyboardInterrupt):
                print(f"\nStopped. Continue with: ei train --resume {run.path}", file=sys.stderr)
        raise
    finally:
        distributed.shutdown(world)


def cmd_plan(args: argparse.Namespace) -> None:
    from ei.train.config import load_config

    config_name, overrides = _split_items(args.items)
    # The plan reads no data: a preset's required data.root gets a stand-in unless given.
    config = load_config(resolve_config(config_name), ["data.root=."] + overrides)
    from ei.plan import format_plan, parse_memory, plan
    from ei.train.preflight import check_models

    limit = parse_memory(args.gpu_memory) if args.gpu_memory else None
    check_models(config)  # a bad model setting is a config error here too
    print(f"Memory of one training step ({config.name}, {config.image_size} px; worked out "
          f"without running the model, see ei/plan.py):\n")
    print(format_plan(plan(config, args.batch), limit))
    print("\nNot counted: the CUDA context (about 0.5 GB) and allocator fragmentation.")


def _note_if_training(run_path: str) -> None:
    """A run being trained has a best.pt per stage so far, some stages none yet: say so."""
    from ei.train.rundir import RunDir, RunDirError

    try:
        holder = RunDir.open(run_path).trainer()
    except RunDirError:
        return  # the command itself says what is missing
    if holder is not None:
        print(f"note: {run_path} is being trained right now by {holder}: its checkpoints "
              f"are the best so far, not the final ones", file=sys.stderr)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from ei.evaluate import evaluate_run

    _note_if_training(args.run)
    evaluate_run(args.run, args.split, None if args.stage == "all" else [args.stage], args.device,
                 args.out)


def cmd_predict(args: argparse.Namespace) -> None:
    if not Path(args.annotations).is_file():
        raise FileNotFoundError(errno.ENOENT, "--annotations: no such file", args.annotations)
    from ei.predict import predict

    _note_if_training(args.run)
    path = predict(args.run, args.annotations, args.root, args.stage, args.out, args.device,
                   args.batch_size)
    print(f"Predictions: {path}")


def cmd_attention(args: argparse.Namespace) -> None:
    from ei.attention import draw

    _note_if_training(args.run)
    paths = draw(args.run, args.out, args.split, args.count, args.stage, args.device)
    print(f"{len(paths)} attention overlays in {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ei", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train", help="train single-modality models, EI and the late-fusion baseline",
        description="Train every stage of a run. CONFIG is a YAML file or the name of one in "
                    f"configs/ (default: {DEFAULT_CONFIG}); key=value items override config "
                    "keys, e.g. single.epochs=3 model.inject_layer=null.")
    train.add_argument("items", nargs="*", metavar="[CONFIG] [key=value ...]")
    train.add_argument("--resume", metavar="RUN", help="continue a run from its last checkpoints")
    train.add_argument("--run-dir", metavar="DIR",
                       help="where the run goes (default: <out_dir>/<name>-<timestamp>)")
    train.set_defaults(func=cmd_train, subparser=train)

    plan = commands.add_parser(
        "plan", help="memory of a training step per stage, precision and checkpointing",
        description="Work out, without running the model, the peak memory of one training "
                    "step of each stage (weights, gradients and optimizer state, saved "
                    "activations, a workspace estimate) in fp32, bf16 and fp16, with and "
                    "without activation checkpointing, and the largest batch that fits.")
    plan.add_argument("items", nargs="*", metavar="[CONFIG] [key=value ...]")
    plan.add_argument("--gpu-memory", metavar="SIZE", help="e.g. 16GB: the largest batch in it")
    plan.add_argument("--batch", type=positive_int, help="batch size (default: the config's)")
    plan.set_defaults(func=cmd_plan, subparser=plan)

    evaluate = commands.add_parser(
        "evaluate", help="per-class AP, AUC, sensitivity, specificity, F1, accuracy, mAP",
        description="Evaluate the best checkpoints of a run on a split of its data: a table per "
                    "model, and CSV files.")
    evaluate.add_argument("run", metavar="RUN", help="a run directory written by ei train")
    evaluate.add_argument("--split", default="test", choices=("train", "val", "test"))
    evaluate.add_argument("--stage", default="all",
                          help="ei, late_fusion, single/<modality> or all (default: every trained one)")
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--out", metavar="DIR", help="where the CSV files go (default: RUN/eval)")
    evaluate.set_defaults(func=cmd_evaluate, subparser=evaluate)

    predict = commands.add_parser(
        "predict", help="class probabilities per sample to CSV",
        description="Predict with a trained run on the samples of an annotation file "
                    "('<paths>' or '<paths>\\t<labels>' per line: labels are optional).")
    predict.add_argument("run", metavar="RUN", help="a run directory written by ei train")
    predict.add_argument("--annotations", required=True, metavar="FILE")
    predict.add_argument("--root", metavar="DIR", help="data root of the paths (default: the run's)")
    predict.add_argument("--stage", default="ei", help="ei, late_fusion or single/<modality>")
    predict.add_argument("--out", metavar="CSV",
                         help="default: RUN/predictions/<annotation file>_<stage>.csv")
    predict.add_argument("--device", default="auto")
    predict.add_argument("--batch-size", type=positive_int, default=32)
    predict.set_defaults(func=cmd_predict, subparser=predict)

    attention = commands.add_parser(
        "attention", help="PNG overlays of the main backbone's CLS attention, with/without [INT]",
        description="Draw what the CLS token of each main backbone attends to in its last "
                    "block, without and with the [INT] tokens (the paper's Fig. 2).")
    attention.add_argument("run", metavar="RUN", help="a run directory written by ei train")
    attention.add_argument("--out", required=True, metavar="DIR")
    attention.add_argument("--split", default="test", choices=("train", "val", "test"))
    attention.add_argument("--count", type=positive_int, default=8,
                           help="how many samples (the first ones)")
    attention.add_argument("--stage", default="ei")
    attention.add_argument("--device", default="auto")
    attention.set_defaults(func=cmd_attention, subparser=attention)
    return parser


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Arguments, with the config and key=value items accepted after options too (`ei plan
    CONFIG --gpu-memory 16GB data.root=/x`: argparse alone stops collecting the items at the
    first option); an unknown option is an error in the subcommand's own usage."""
    args, unknown = build_parser().parse_known_args(argv)
    items = [u for u in unknown if not u.startswith("-")]  # _split_items checks them
    rest = [u for u in unknown if u.startswith("-")]
    if rest or (items and not hasattr(args, "items")):
        args.subparser.error(f"unrecognized arguments: {' '.join(rest or items)}")
    if items:
        args.items = [*args.items, *items]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # Imported after parsing, so that --help does not wait for torch.
    from ei.data import DataError
    from ei.train.config import ConfigError
    from ei.train.diverged import TrainingDiverged

    try:
        args.func(args)
    except (ConfigError, DataError, TrainingDiverged) as err:
        print(f"ei {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # missing, unwritable or full: the path and the cause, no traceback
        print(f"ei {args.command}: error: {describe_os_error(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ei {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
