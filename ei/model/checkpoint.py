"""Reading weight files and loading them strictly, with errors that name what does not fit."""

from __future__ import annotations

import errno
import pickle
import re
import zipfile
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn


class CheckpointError(OSError):
    """A weight or checkpoint file that exists but cannot be read as one: damaged, cut short, or
    holding something other than tensors. An OSError (EIO) naming the file, so that the ``ei``
    command reports it in one line like any other unreadable file."""

    def __init__(self, path: Path, what: str, why: str):
        super().__init__(errno.EIO, f"{what}: cannot be read ({why})", str(path))


def torch_load(path: str | Path, what: str = "checkpoint"):
    """torch.load(weights_only=True) on the CPU, with CheckpointError for a file it cannot read.
    torch's own message for a pickle of other objects suggests weights_only=False, which would
    run code from the file: not advice to pass on."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (PermissionError, IsADirectoryError, FileNotFoundError):
        raise
    except pickle.UnpicklingError as err:
        # Keep torch's "Unsupported global: GLOBAL argparse.Namespace" (what else the file
        # holds), drop its advice.
        found = re.search(r"Unsupported global: GLOBAL [\w.]+", str(err))
        raise CheckpointError(path, what, "it is not a torch.save file of tensors and plain "
                                          "values" + (f"; {found.group(0)}" if found else "")
                              ) from err
    except Exception as err:  # damaged zip or legacy-format files raise many kinds
        cause = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise CheckpointError(path, what, f"damaged or cut short: {cause}") from err


def _is_torchscript(path: Path) -> bool:
    # OpenAI's CLIP releases are TorchScript archives; torch.load(weights_only=True) refuses them.
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("constants.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, UnicodeDecodeError, NotImplementedError, ValueError, EOFError):
        return False  # a damaged archive: torch_load says so, naming the file


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a checkpoint file: .safetensors, a torch.save'd dict (a state dict, or one
    under "state_dict" / "model"), or a TorchScript archive (original OpenAI CLIP files)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # safetensors' own error type for a damaged header
            raise CheckpointError(path, "checkpoint", f"damaged safetensors file: {err}") from err
    if _is_torchscript(path):
        try:
            return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        except RuntimeError as err:
            raise CheckpointError(path, "checkpoint", "damaged TorchScript archive") from err
    obj = torch_load(path)
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(path, "checkpoint", "expected a mapping of names to tensors")
    return dict(obj)


def load_strict(module: nn.Module, state_dict: Mapping[str, Tensor], what: str) -> None:
    """`module.load_state_dict(state_dict)` that raises KeyError (missing / unexpected keys) or
    ValueError (a shape) with `what` and the offending keys in the message."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise KeyError(
            f"{what}: checkpoint does not fit: missing keys {_short(missing)}, "
            f"unexpected keys {_short(unexpected)}"
        )
    for key, value in state_dict.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise ValueError(
                f"{what}: checkpoint does not fit: {key!r} has shape {tuple(value.shape)}, "
                f"the model expects {tuple(own[key].shape)}"
            )
    module.load_state_dict(state_dict)


def _short(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"[{shown}{more}]"
