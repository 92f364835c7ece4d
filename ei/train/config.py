"""The run configuration: dataclasses with the reference settings as defaults, YAML loading,
and dotted ``key=value`` command-line overrides.

Every key and value is checked while the configuration is built, before any data is read or
model created: an unknown key or a bad value raises :class:`ConfigError` naming the dotted key
(``single.lr``), so a typo costs a second rather than a training run.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

# Light modules only (no torch, no timm): a config error must show within a second.
from ei.data.annotations import read_utf8
from ei.data.presets import get_preset
from ei.model.aliases import ALIASES
from ei.model.mor_config import MoRConfig

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


class ConfigError(ValueError):
    """A bad configuration key or value; the message starts with the dotted key."""


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def _check_counts(section: Any, *names: str) -> None:
    """Each field `names` of `section` is a count: an integer >= 1."""
    for name in names:
        _check(getattr(section, name) >= 1, name, f"must be >= 1, got {getattr(section, name)}")


def _check_seed(seed: int, key: str = "seed") -> None:
    # numpy's generators take seeds in [0, 2**32)
    _check(0 <= seed < 2**32, key, f"must be an integer in [0, 2**32), got {seed}")


@dataclass
class SyntheticConfig:
    """Parameters of the bundled synthetic dataset (``data.preset: synthetic`` only)."""

    seed: int = 0
    n_train: int = 600
    n_val: int = 150
    n_test: int = 150
    noise: float = 0.1

    def __post_init__(self) -> None:
        _check_seed(self.seed)
        _check_counts(self, "n_train", "n_val", "n_test")
        _check(self.noise >= 0, "noise", f"must be >= 0, got {self.noise}")


@dataclass
class DataConfig:
    """Where the data is. Annotation and label-map paths are relative to ``root``."""

    preset: str = "synthetic"
    # None: the synthetic dataset's default location; required for the other presets.
    root: Optional[str] = None
    train: str = "train.txt"
    val: str = "val.txt"
    test: str = "test.txt"
    labels: Optional[str] = "labels.json"  # None: the preset's classes in order
    image_size: Optional[int] = None  # None: the preset's size
    balanced: bool = False  # repeat samples of rare classes in the training split
    workers: int = 0  # DataLoader worker processes
    # Keep decoded items in memory across epochs. Only for splits without random choices:
    # evaluation splits, and training splits of presets that do not augment.
    cache: bool = False
    # The folder train/val/test/labels are relative to, when it is not root: e.g. the
    # authors' published `datasplit` folder, with the images under root.
    splits: Optional[str] = None
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self) -> None:
        _check(self.root is None or self.root.strip() != "", "root",
               "is empty; give the directory that holds the data")
        try:
            get_preset(self.preset)
        except ValueError as err:
            raise ConfigError(f"preset: {err}") from None
        _check(self.image_size is None or self.image_size >= 1, "image_size",
               f"must be >= 1, got {self.image_size}")
        _check(self.workers >= 0, "workers", f"must be >= 0, got {self.workers}")
        _check(self.splits is None or self.splits.strip() != "", "splits",
               "is empty; give the folder of the annotation files, or null for root")


@dataclass
class SyntheticPretrainingConfig:
    """How the demo backbone is pretrained on generic synthetic scenes (ei.train.demo_backbone)."""

    seed: int = 0
    images: int = 4000
    epochs: int = 25
    batch_size: int = 64
    lr: float = 5e-3
    noise: float = 0.1

    def __post_init__(self) -> None:
        _check_seed(self.seed)
        _check_counts(self, "images", "epochs", "batch_size")
        _check(self.batch_size <= self.images, "batch_size",
               f"must be <= images ({self.images}), got {self.batch_size}")
        _check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _check(self.noise >= 0, "noise", f"must be >= 0, got {self.noise}")


def _is_timm_model(name: str) -> bool:
    import timm  # seconds to import: only for names that are not our aliases

    return timm.is_model(name)


@dataclass
class ModelConfig:
    """The backbone (any timm ViT or an alias of ei.model.ALIASES), its adaptation, and EI."""

    backbone: str = "dinov2"
    pretrained: bool = True  # timm's weights (downloaded); False: random init
    checkpoint: Optional[str] = None  # or a local weight file
    # Or weights made here once (cached) by pretraining on generic synthetic scenes: the CPU
    # demo's stand-in for a pretrained VFM. Synthetic preset only.
    synthetic_pretraining: Optional[SyntheticPretrainingConfig] = None
    timm_kwargs: dict = field(default_factory=dict)
    mor: MoRConfig = field(default_factory=MoRConfig)
    grad_checkpointing: bool = False  # recompute blocks in backward: less memory, more time
    inject_layer: Optional[int] = 0  # block the [INT] tokens join before
    int_position: str = "append"
    adapter_hidden: int = 384

    def __post_init__(self) -> None:
        _check(self.backbone in ALIASES or _is_timm_model(self.backbone), "backbone",
               f"{self.backbone!r} is neither an alias {sorted(ALIASES)} nor a timm model")
        sources = [self.pretrained, self.checkpoint is not None,
                   self.synthetic_pretraining is not None]
        _check(sum(sources) <= 1, "pretrained", "give one source of weights: pretrained, "
               "checkpoint or synthetic_pretraining, not several")
        _check(self.inject_layer is None or self.inject_layer >= 0, "inject_layer",
               f"must be a block index >= 0 or null (late fusion), got {self.inject_layer}")
        _check(self.int_position in ("append", "prepend"), "int_position",
               f"expected 'append' or 'prepend', got {self.int_position!r}")
        _check(self.adapter_hidden >= 1, "adapter_hidden",
               f"must be >= 1 (the [INT] adapters' hidden width), got {self.adapter_hidden}")


@dataclass
class LossConfig:
    """Weights of the EI loss terms (docs/EI_SPEC.md, Losses)."""

    fused_weight: float = 1.0
    main_weight: float = 1.0
    aux_weight: float = 0.3
    gate_weight: float = 0.1
    use_aux: bool = True
    use_gate: bool = True
    # The modality whose prior is lowered; None: the single-modality model with the best
    # training-set mAP in stage one (docs/EI_SPEC.md). The dataset configs fix it as the
    # authors' code does.
    best_modality: Optional[str] = None
    prior_low: float = 1e-3

    def __post_init__(self) -> None:
        for name in ("fused_weight", "main_weight", "aux_weight", "gate_weight"):
            value = getattr(self, name)
            _check(math.isfinite(value) and value >= 0, name,
                   f"must be a finite number >= 0, got {value}")
        # a factor on the best modality's loss when the gate's target is ranked: 1 is no prior
        _check(0 <= self.prior_low <= 1, "prior_low", f"must be in [0, 1], got {self.prior_low}")


# The evaluation protocols (docs/REPRODUCING.md): "ours" and "paper", the authors' public code
# where it differs from ours. Each item can also be set on its own (protocol.scoring=...).
PROTOCOLS = {
    "ours": {"scoring": "probabilities", "prior": "train_map", "gate_target": "task_loss",
             "eval_pick": "first", "validation": "epoch", "schedule": "warmup_cosine",
             "transforms": "ours", "slice_augmentation": "per_volume",
             "slice_sampling": "segments", "resampling": "antialiased"},
    "paper": {"scoring": "logits", "prior": "fixed", "gate_target": "cross_entropy",
              "eval_pick": "first_sorted", "validation": "interval", "schedule": "cyclic",
              "transforms": "authors", "slice_augmentation": "per_slice",
              "slice_sampling": "rounded", "resampling": "authors"},
}
PROTOCOL_CHOICES = {
    # What AP/AUC rank: softmax (sigmoid for multi-label) probabilities, or raw logits.
    "scoring": ("probabilities", "logits"),
    # The loss prior's best modality: loss.best_modality as given ("fixed"), or the single
    # model with the best training-set mAP ("train_map", with loss.best_modality null).
    "prior": ("fixed", "train_map"),
    # How L_ag ranks the modalities of a sample: by the task's own loss (BCE for multi-label
    # data), or by cross-entropy against the (multi-hot) target, under which a sample with no
    # positive label ranks every modality 0 and so always picks the first.
    "gate_target": ("task_loss", "cross_entropy"),
    # Which image of a several-image modality (MMC-AMD's OCT B-scans) evaluation takes: the
    # first as listed, or the first after sorting the paths.
    "eval_pick": ("first", "first_sorted"),
    # When to validate (and so when patience counts and best.pt can change): after every epoch,
    # or every int(training samples / global batch) + 1 iterations (about one epoch and one
    # step) and before the first iteration.
    "validation": ("epoch", "interval"),
    # The learning rate, per iteration: linear warm-up then cosine to min_lr over the epochs,
    # or cyclic (ei.train.schedule): triangles between min_lr and lr, each 8 of the authors'
    # validation intervals long (whatever the cadence), peaks shrinking by 0.8 per cycle,
    # momentum cycled 0.9-0.8.
    # It also gives the epoch cap and floor where a stage sets none (SCHEDULE_DEFAULTS).
    "schedule": ("warmup_cosine", "cyclic"),
    # The image pipeline (ei.data.transforms): ours (crop, antialiased resize, rotate, flip,
    # colour with clamping) or the authors' (whole-degree rotation, crop in whole pixels, flip,
    # plain bilinear resize, contrast-brightness-saturation, one clip).
    "transforms": ("ours", "authors"),
    # Volume slices of one sample: one set of augmentation parameters, or each its own.
    "slice_augmentation": ("per_volume", "per_slice"),
    # Which slices of a depth-D volume: one from each of I equal segments (centres in
    # evaluation), or round((k + 1/2) (D - 1) / I) (jittered by up to half a step in training).
    "slice_sampling": ("segments", "rounded"),
    # Position embeddings resized to another grid: antialiased bicubic (timm), or the authors'
    # (DINOv2 antialiased bicubic, as its hub model; other backbones plain bicubic).
    "resampling": ("antialiased", "authors"),
}
# Epoch cap and lr floor of a stage that sets none, per schedule: ours, and the authors'
# (their loop stops after 200 epochs, their cyclic lr starts at 1e-5).
SCHEDULE_DEFAULTS = {"warmup_cosine": {"epochs": 50, "min_lr": 1e-7},
                     "cyclic": {"epochs": 200, "min_lr": 1e-5}}


@dataclass
class ProtocolConfig:
    """`name` gives every item its default; an item set here overrides it."""

    name: str = "ours"
    scoring: Optional[str] = None
    prior: Optional[str] = None
    gate_target: Optional[str] = None
    eval_pick: Optional[str] = None
    validation: Optional[str] = None
    schedule: Optional[str] = None
    transforms: Optional[str] = None
    slice_augmentation: Optional[str] = None
    slice_sampling: Optional[str] = None
    resampling: Optional[str] = None

    def __post_init__(self) -> None:
        _check(self.name in PROTOCOLS, "name",
               f"expected one of {list(PROTOCOLS)}, got {self.name!r}")
        for item, choices in PROTOCOL_CHOICES.items():
            if getattr(self, item) is None:
                setattr(self, item, PROTOCOLS[self.name][item])
            _check(getattr(self, item) in choices, item,
                   f"expected one of {list(choices)}, got {getattr(self, item)!r}")


@dataclass
class OptimConfig:
    """One stage's optimisation: SGD with momentum, the lr of protocol.schedule per iteration.
    `epochs` and `min_lr` left null take the schedule's SCHEDULE_DEFAULTS."""

    epochs: Optional[int] = None
    batch_size: int = 8  # per process
    eval_batch_size: Optional[int] = None  # None: batch_size
    lr: float = 1e-3
    momentum: float = 0.95
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0  # warmup_cosine only
    min_lr: Optional[float] = None
    patience: int = 10  # validations without improvement before stopping; 0: never stop early

    def __post_init__(self) -> None:
        _check(self.epochs is None or self.epochs >= 1, "epochs",
               f"must be >= 1, got {self.epochs}")
        _check_counts(self, "batch_size")
        _check(self.eval_batch_size is None or self.eval_batch_size >= 1, "eval_batch_size",
               f"must be >= 1, got {self.eval_batch_size}")
        _check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _check(self.min_lr is None or 0 <= self.min_lr <= self.lr, "min_lr",
               f"must be in [0, lr={self.lr}], got {self.min_lr}")
        _check(0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum}")
        _check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.warmup_epochs >= 0, "warmup_epochs", f"must be >= 0, got {self.warmup_epochs}")
        _check(self.patience >= 0, "patience", f"must be >= 0, got {self.patience}")


@dataclass
class RuntimeConfig:
    """How to run: none of these change what is computed, except precision."""

    device: str = "auto"  # auto: cuda if available (cuda:LOCAL_RANK under torchrun), else cpu
    precision: str = "auto"  # auto: bf16 on sm_80+ GPUs, fp16 (scaled) before, fp32 on CPU
    threads: Optional[int] = None  # CPU threads per process; None: torch's default
    progress: bool = True
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower on GPU)

    def __post_init__(self) -> None:
        _check(self.precision in PRECISIONS, "precision",
               f"expected one of {PRECISIONS}, got {self.precision!r}")
        _check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
               "device", f"expected auto, cpu, cuda or cuda:N, got {self.device!r}")
        _check(self.threads is None or self.threads >= 1, "threads", f"must be >= 1, got {self.threads}")


@dataclass
class Config:
    name: str = "ei"
    seed: int = 0
    out_dir: str = "runs"  # a run goes to <out_dir>/<name>-<timestamp> unless --run-dir is given
    late_fusion: bool = True  # also train the late-fusion baseline (EI without [INT] tokens)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    single: OptimConfig = field(default_factory=OptimConfig)  # stage one: per modality
    ei: OptimConfig = field(default_factory=OptimConfig)  # stage two: EI and late fusion
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        _check_seed(self.seed)
        for stage in ("single", "ei"):
            optim = getattr(self, stage)
            for key, value in SCHEDULE_DEFAULTS[self.protocol.schedule].items():
                if getattr(optim, key) is None:
                    setattr(optim, key, value)
            _check(optim.min_lr <= optim.lr, f"{stage}.min_lr", f"must be <= lr={optim.lr}, got "
                   f"{optim.min_lr} (protocol.schedule {self.protocol.schedule!r})")
        modalities = get_preset(self.data.preset).modalities
        best = self.loss.best_modality
        _check(best is None or best in modalities, "loss.best_modality",
               f"{best!r} is not a modality of preset {self.data.preset!r}: {list(modalities)}")
        _check(best is not None or self.protocol.prior != "fixed", "loss.best_modality",
               f"protocol.prior 'fixed' needs the modality to lower, one of {list(modalities)}")
        # Set but unused would be a silent surprise: say which of the two is meant.
        _check(best is None or self.protocol.prior != "train_map", "loss.best_modality",
               f"{best!r} is not used under protocol.prior 'train_map' (the prior goes to the "
               f"best single model on the training set): set loss.best_modality=null, or "
               f"protocol.prior=fixed to use it")
        _check(self.data.root is not None or self.data.preset == "synthetic", "data.root",
               f"preset {self.data.preset!r} needs the directory of its data")
        _check(self.model.synthetic_pretraining is None or (
            self.data.preset == "synthetic" and self.image_size == get_preset("synthetic").image_size),
            "model.synthetic_pretraining", "pretrains on the synthetic preset's images: use it "
            "with data.preset synthetic at its image size")

    @property
    def image_size(self) -> int:
        return self.data.image_size or get_preset(self.data.preset).image_size


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass conversion with checked keys and types


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _convert(value: Any, hint: Any, key: str) -> Any:
    """`value` as type `hint`, or ConfigError naming `key`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {hint.__name__} fields, got {value!r}")
        return from_dict(hint, value, key + ".")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own error says more than "expected X or null"
            return _convert(value, options[0], key)
        for arg in options:
            try:
                return _convert(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {' or '.join(map(_type_name, args))}, got {value!r}")
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        # YAML 1.1 reads 1e-3 (no dot) as a string: accept any number-like text.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        for name, item in value.items():
            # YAML reads {embed_dim:32} as the key "embed_dim:32" with no value
            if isinstance(name, str) and ":" in name and item is None:
                field, _, text = name.partition(":")
                raise ConfigError(f"{key}: {name!r} is one key without a value; for the value "
                                  f"{text!r} write a space after the colon ({field}: {text})")
        return dict(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    raise TypeError(f"{key}: no conversion for type {hint!r}")  # a bug in a dataclass, not input


# Keys that have moved: old name -> new name (the error says where to).
MOVED_KEYS = {"data.eval_pick": "protocol.eval_pick"}


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from `data`; missing keys take their defaults."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in data if k not in names]
    if unknown:
        key = prefix + unknown[0]
        if key in MOVED_KEYS:
            raise ConfigError(f"{key}: now {MOVED_KEYS[key]}")
        raise ConfigError(f"{key}: unknown key; expected one of {', '.join(names)}")
    kwargs = {k: _convert(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as err:
        # Errors of __post_init__ name the field; give them the full dotted path.
        raise ConfigError(f"{prefix}{err}") from None
    except (ValueError, TypeError, KeyError) as err:
        # Dataclasses of the model layer raise their own errors ("mor.ranks: ..."): under
        # prefix "model.mor." that reads "model.mor.ranks: ...".
        where, text = prefix.rstrip(".") or "config", str(err)
        last = where.rsplit(".", 1)[-1]
        if text.startswith(last + "."):
            raise ConfigError(f"{where}{text[len(last):]}") from None
        raise ConfigError(f"{where}: {text}") from None


def to_dict(config: Any) -> dict:
    """Plain YAML-able data (tuples become lists) that `from_dict` turns back into `config`."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(config))


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set dotted keys in nested `data` from ``key=value`` strings; values are YAML."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. single.epochs=3")
        if not text.strip():  # YAML reads nothing as null, which may mean "the default"
            raise ConfigError(f"{key}: no value after '='; write {key}=null for null")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"{key}: cannot read value {text!r} ({err})") from None
        parts = key.split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(parts[: i + 1])}: is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(read_utf8(path, ConfigError))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    return data


def read_run_config(path: str | Path) -> dict:
    """The config a run saved, in today's keys. A protocol item the run's config lacks was not
    a choice yet when it was saved, and the code then did what protocol "ours" does; runs saved
    before `protocol` existed (2026-12-02) also had `data.eval_pick` (now protocol.eval_pick)
    and the prior fixed when loss.best_modality was set, else by training mAP."""
    data = read_yaml(path)
    if "protocol" in data:
        protocol = dict(data["protocol"] or {})
    else:
        section = dict(data.get("data") or {})
        best = (data.get("loss") or {}).get("best_modality")
        data = {**data, "data": section}
        protocol = {"name": "ours", "eval_pick": section.pop("eval_pick", "first"),
                    "prior": "fixed" if best is not None else "train_map"}
    for item, value in PROTOCOLS["ours"].items():
        protocol.setdefault(item, value)
    return {**data, "protocol": protocol}


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- YAML file (if any) <- overrides."""
    data = read_yaml(path) if path is not None else {}
    return from_dict(Config, apply_overrides(data, list(overrides)))


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")
