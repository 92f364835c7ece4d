"""The ``ei`` command: train, evaluate, predict, attention.

    ei train                                # the demonstration on the bundled synthetic data
    ei train configs/derm7pt.yaml data.root=/data/derm7pt single.epochs=30
    ei train --resume runs/synthetic-20260101-120000
    torchrun --nproc_per_node 4 -m ei.cli train configs/mrnet.yaml data.root=/data/mrnet
    ei evaluate RUN [--split test] [--stage ei]
    ei predict RUN --annotations FILE [--out probs.csv]
    ei attention RUN --out DIR [--count 8]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_CONFIG = "synthetic"


def resolve_config(name: str | None) -> Path:
    """A YAML path, or the name of a file in the repository's configs/ folder."""
    from ei.train.config import ConfigError

    name = name or DEFAULT_CONFIG
    path = Path(name)
    if path.is_file():
        return path
    bundled = CONFIG_DIR / f"{name}.yaml"
    if bundled.is_file():
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
    from ei.train.config import Config, ConfigError, apply_overrides, from_dict, read_yaml

    fixed = [o for o in overrides if not o.startswith("runtime.")]
    if fixed:
        raise ConfigError(f"{fixed[0].partition('=')[0]}: cannot change when resuming "
                          f"(only runtime.* settings can); start a new run instead")
    return from_dict(Config, apply_overrides(read_yaml(run.config_path), overrides))


def cmd_train(args: argparse.Namespace) -> None:
    from ei.train import distributed
    from ei.train.config import load_config
    from ei.train.pipeline import format_summary, train_all
    from ei.train.rundir import RunDir

    config_name, overrides = _split_items(args.items)
    if args.resume:
        if config_name or args.run_dir:
            raise SystemExit("ei train: --resume takes the config of the run; give no config file "
                             "or --run-dir with it")
        run = RunDir.open(args.resume)
        config = _resume_config(run, overrides)
    else:
        config = load_config(resolve_config(config_name), overrides)
    world = distributed.init(config.runtime.device)
    try:
        if not args.resume:
            # Rank 0 names and creates the directory; the others take its choice.
            run = RunDir.create(config, args.run_dir) if world.is_main else None
            run = distributed.all_gather_objects(run, world)[0]
        if world.is_main:
            print(f"Run directory: {run.path}", flush=True)
        results = train_all(config, run, world)
        if world.is_main:
            test_size = results[next(iter(results))]["test"]["num_samples"]
            print(f"\nTest results ({config.data.preset}, {test_size} samples, best checkpoint "
                  f"of each model by validation mAP):")
            print(format_summary(results))
            print(f"\nRun directory: {run.path}")
    finally:
        distributed.shutdown(world)


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
    train.set_defaults(func=cmd_train)

    from ei.evaluate import add_parser as add_evaluate
    from ei.predict import add_parser as add_predict
    from ei.attention import add_parser as add_attention

    add_evaluate(commands)
    add_predict(commands)
    add_attention(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ei.data import DataError
    from ei.train.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, DataError, FileNotFoundError) as err:
        print(f"ei {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ei {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
