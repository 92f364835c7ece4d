"""Read images and volumes; every failure names the full path (and the annotation line)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .annotations import ImageError


def _error(path: Path, where: str, what: str) -> ImageError:
    ref = f" (referenced by {where})" if where else ""
    return ImageError(f"{path}: {what}{ref}")


def _case_variant(path: Path) -> Path | None:
    """An existing file whose path differs from `path` only in letter case, found component
    by component (annotation files written on case-insensitive disks often have such paths:
    Derm7pt's lists FCL/FCL067.JPG beside FCl/Fcl068.jpg)."""
    current = Path(path.anchor) if path.is_absolute() else Path(".")
    for part in path.parts[1:] if path.is_absolute() else path.parts:
        candidate = current / part
        if not candidate.exists():
            try:
                matches = [c for c in current.iterdir() if c.name.lower() == part.lower()]
            except OSError:
                return None
            if len(matches) != 1:
                return None
            candidate = matches[0]
        current = candidate
    return current if current.is_file() and current != path else None


def check_file(path: Path, kind: str, where: str = "") -> None:
    """Fail early on a missing file or one whose header cannot be read (cheap: no decoding)."""
    if not path.is_file():
        variant = _case_variant(path)
        if variant is not None:
            raise _error(path, where, f"file not found; {variant} differs only in letter case "
                                      f"(this disk tells case apart): fix the line or rename "
                                      f"the file")
        raise _error(path, where, "file not found")
    if kind == "volume":
        open_volume(path, where)
        return
    try:
        with Image.open(path):
            pass
    except Exception as e:  # PIL and the OS raise many types; all mean "unreadable"
        raise _error(path, where, f"cannot read image ({e})") from e


# Greyscale modes deeper than 8 bits (16-bit PNG and TIFF scans: OCT, X-ray), which
# convert("RGB") would clip to 255 (nearly all white) or truncate (floats nearly all black).
_DEEP_GREY = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535,
              "F": 1}


def _deep_grey(array: np.ndarray, mode: str, path: Path, where: str) -> torch.Tensor:
    """(3, H, W) in [0, 1] from a deep greyscale image: 16-bit values over 65535, 32-bit
    integers (PIL's mode for many 16-bit PNGs) likewise when they lie in 0..65535, floats as
    they are when they lie in [0, 1]; anything else has no scale we could know, so it is refused
    rather than guessed."""
    values = array.astype(np.float32)
    top = _DEEP_GREY[mode]
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if not (np.isfinite(values).all() and low >= 0 and high <= top):
        raise _error(path, where, f"pixel values from {low:g} to {high:g} in a mode {mode} image; "
                                  f"expected 0 to {top} (save it scaled, or as 8 or 16 bits)")
    return torch.from_numpy(values / top).expand(3, *values.shape).contiguous()


def load_image(path: Path, where: str = "") -> torch.Tensor:
    """An RGB image as float (3, H, W) in [0, 1]; a greyscale one repeated over the channels,
    on its own depth's scale (8 bits: / 255, 16 bits: / 65535, float: as it is)."""
    try:
        with Image.open(path) as img:
            mode = img.mode
            array = np.array(img if mode in _DEEP_GREY else img.convert("RGB"))
    except Exception as e:
        raise _error(path, where, f"cannot read image ({e})") from e
    if mode in _DEEP_GREY:
        return _deep_grey(array, mode, path, where)
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)


def open_volume(path: Path, where: str = "") -> np.ndarray:
    """A memory-mapped S x H x W volume: only the slices used are read from disk."""
    try:
        volume = np.load(path, mmap_mode="r")
        if volume.ndim != 3 or 0 in volume.shape:
            raise ValueError(f"expected a volume S x H x W, got shape {volume.shape}")
    except Exception as e:
        raise _error(path, where, f"cannot read volume ({e})") from e
    return volume


def volume_slices(volume: np.ndarray, indices: list[int]) -> torch.Tensor:
    """Chosen slices as float (len(indices), H, W) in [0, 1].

    uint8 volumes (MRNet) are divided by 255; other dtypes are min-max scaled over the
    whole volume so that all slices of one volume share one scale.
    """
    slices = np.asarray(volume[indices], dtype=np.float32)
    if volume.dtype == np.uint8:
        return torch.from_numpy(slices / 255.0)
    lo, hi = float(volume.min()), float(volume.max())
    if hi <= lo:
        return torch.zeros(slices.shape)
    return torch.from_numpy((slices - lo) / (hi - lo))
