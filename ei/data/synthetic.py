"""A small synthetic two-modality dataset whose label needs both modalities.

Generative rule (generator version 1), for each sample:

1. Draw a quadrant q uniformly from {0: top-left, 1: top-right, 2: bottom-left,
   3: bottom-right} and an arrangement: a uniformly random permutation that puts each of
   the 4 patterns (horizontal stripes, vertical stripes, checkerboard, solid) in exactly
   one quadrant.
2. ``locator`` image (32 x 32 RGB): a dark uniform background with one bright disk
   (radius 3-5 px) at a random place inside quadrant q. It says *where* to look.
3. ``appearance`` image (32 x 32 RGB): each 16 x 16 quadrant filled with its pattern,
   random colours, contrast 0.25-0.5, stripe width 2-3 px and random phase. It says
   *what* is where; three of the four quadrants are distractors.
4. Label = the pattern at quadrant q. Gaussian noise (sigma ``noise``, default 0.1) is
   added to both images, which are then clipped and stored as 8-bit PNG.

Each modality alone carries no information about the label: the arrangement always
contains every pattern once, so the appearance image looks the same whatever the label;
and q is independent of the arrangement, so the label given q is uniform. A classifier
that sees one modality is at chance (25 %); one that combines both can be near perfect.

Files are written in the annotation format of docs/EI_SPEC.md (``train.txt``, ``val.txt``,
``test.txt``, ``labels.json``, PNGs under ``images/``) plus ``scenes.json`` (the drawn
quadrant, arrangement and label of every sample) and ``manifest.json`` (version, seed,
parameters), so the real loader path runs. Generation takes a few seconds; it is redone
only when the manifest differs from what is asked for. With several processes (torchrun),
call it on rank 0 first and let the others wait at a barrier.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from .annotations import DataError
from .presets import get_preset

GENERATOR_VERSION = 1
PRESET = get_preset("synthetic")
PATTERNS = PRESET.classes  # horizontal, vertical, checker, solid: the class names
SIZE = PRESET.image_size
SPLITS = ("train", "val", "test")
# Pixel coordinates of the whole image and of one quadrant, computed once.
_Y, _X = np.mgrid[:SIZE, :SIZE]
_QY, _QX = np.mgrid[: SIZE // 2, : SIZE // 2]


def default_root() -> Path:
    """$EI_SYNTHETIC_DIR, else data/synthetic in a source checkout, else ~/.cache/ei/synthetic."""
    if os.environ.get("EI_SYNTHETIC_DIR"):
        return Path(os.environ["EI_SYNTHETIC_DIR"])
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file():
        return repo / "data" / "synthetic"
    return Path.home() / ".cache" / "ei" / "synthetic"


def pattern_tile(kind: int, rng: np.random.Generator) -> np.ndarray:
    """One quadrant (SIZE/2 x SIZE/2 x 3) of an appearance image, pattern `kind` (an index
    of PATTERNS) with random colours, contrast and phase, in [0, 1]."""
    base = rng.uniform(0.2, 0.8, size=3)
    contrast = rng.uniform(0.25, 0.5)
    width = int(rng.integers(2, 4))
    phase_y, phase_x = rng.integers(0, 2 * width, size=2)
    bands_y = ((_QY + phase_y) // width) % 2
    bands_x = ((_QX + phase_x) // width) % 2
    on = {0: bands_y, 1: bands_x, 2: bands_y ^ bands_x, 3: np.zeros_like(_QY)}[kind]
    return base + contrast * (on[..., None] - 0.5)


def locator_image(quadrant: int, rng: np.random.Generator) -> np.ndarray:
    """A locator image (SIZE x SIZE x 3): one bright disk inside `quadrant` on a dark ground."""
    half = SIZE // 2
    image = np.broadcast_to(rng.uniform(0.0, 0.35, size=3), (SIZE, SIZE, 3)).copy()
    radius = int(rng.integers(3, 6))
    # Keep the whole disk inside its quadrant.
    cy = (quadrant // 2) * half + rng.integers(radius, half - radius)
    cx = (quadrant % 2) * half + rng.integers(radius, half - radius)
    image[(_Y - cy) ** 2 + (_X - cx) ** 2 <= radius**2] = rng.uniform(0.75, 1.0, size=3)
    return image


def appearance_image(arrangement, rng: np.random.Generator) -> np.ndarray:
    """An appearance image (SIZE x SIZE x 3): quadrant q filled with pattern arrangement[q]."""
    half = SIZE // 2
    image = np.empty((SIZE, SIZE, 3))
    for quadrant, kind in enumerate(arrangement):
        r, c = (quadrant // 2) * half, (quadrant % 2) * half
        image[r : r + half, c : c + half] = pattern_tile(int(kind), rng)
    return image


def _to_png(image: np.ndarray, noise: float, rng: np.random.Generator, path: Path) -> None:
    noisy = image + rng.normal(0.0, noise, size=image.shape)
    Image.fromarray(np.round(np.clip(noisy, 0.0, 1.0) * 255).astype(np.uint8)).save(path)


def _write_split(out: Path, split: str, count: int, seed: int, noise: float) -> list[dict]:
    # One random stream per split: changing the size of one split leaves the others alone.
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    (out / "images" / split).mkdir(parents=True)
    scenes, lines = [], []
    for i in range(count):
        quadrant = int(rng.integers(4))
        arrangement = rng.permutation(4)
        label = int(arrangement[quadrant])
        names = [f"images/{split}/{i:04d}_{m}.png" for m in PRESET.modalities]
        _to_png(locator_image(quadrant, rng), noise, rng, out / names[0])
        _to_png(appearance_image(arrangement, rng), noise, rng, out / names[1])
        lines.append(f"{','.join(names)}\t{PATTERNS[label]}\n")
        scenes.append({"quadrant": quadrant, "arrangement": arrangement.tolist(), "label": label})
    (out / f"{split}.txt").write_text("".join(lines), encoding="utf-8")
    return scenes


# The marker in manifest.json that says this program made the directory: only such a
# directory (or a new or empty one) is ever replaced by a newly generated set.
MADE_BY = "ei.data.synthetic"


class SyntheticRootError(DataError):
    """The synthetic data's directory holds something this program did not make."""


def _manifest(seed: int, sizes: dict[str, int], noise: float) -> dict:
    return {"made_by": MADE_BY, "generator_version": GENERATOR_VERSION, "seed": seed,
            "sizes": sizes, "noise": noise, "image_size": SIZE}


def _made_here(found: dict) -> bool:
    # Sets generated before the marker existed have exactly the old manifest's keys.
    legacy = {"generator_version", "seed", "sizes", "noise", "image_size"}
    return found.get("made_by") == MADE_BY or set(found) == legacy


def check_synthetic_root(root: str | Path | None = None) -> Path:
    """The directory the synthetic set goes to, if generating it there destroys nothing: it
    does not exist, is empty, or holds a set this program made. Anything else is an error
    naming the path, before any work; it is most often a real dataset given to the synthetic
    preset because the dataset's config file was left out."""
    root = Path(root) if root is not None else default_root()
    if root.exists() and not root.is_dir():
        raise SyntheticRootError(f"synthetic data directory {root} is a file, not a directory")
    if not root.is_dir() or not any(root.iterdir()):
        return root
    try:
        found = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        found = None
    if isinstance(found, dict) and _made_here(found):
        return root
    raise SyntheticRootError(
        f"{root} is not empty and was not made by ei's synthetic-data generator (no "
        f"{MADE_BY} manifest.json), so nothing is generated there: it is left untouched. "
        f"For your own data give its config file, e.g. `ei train configs/derm7pt.yaml "
        f"data.root={root}`; for the synthetic demo give a new or empty data.root (or "
        f"EI_SYNTHETIC_DIR)."
    )


def _is_current(root: Path, manifest: dict) -> bool:
    try:
        found = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    files = [f"{s}.txt" for s in SPLITS] + ["labels.json"]
    return found == manifest and all((root / f).is_file() for f in files)


def ensure_synthetic_dataset(
    root: str | Path | None = None,
    seed: int = 0,
    n_train: int = 600,
    n_val: int = 150,
    n_test: int = 150,
    noise: float = 0.1,
) -> Path:
    """Generate the dataset under ``root`` (default: :func:`default_root`) unless it is
    already there with the same version, seed and parameters; return its directory.

    Use it with ``get_preset("synthetic")`` and ``root / "labels.json"``.
    """
    root = check_synthetic_root(root)
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    manifest = _manifest(seed, sizes, noise)
    if _is_current(root, manifest):
        return root

    # Build in a sibling temporary directory and move it into place, so that a killed
    # run or a second process (e.g. another torchrun rank) never sees a half-written set.
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        scenes = {split: _write_split(tmp, split, n, seed, noise) for split, n in sizes.items()}
        labels = {name: i for i, name in enumerate(PATTERNS)}
        (tmp / "labels.json").write_text(json.dumps(labels, indent=1), encoding="utf-8")
        (tmp / "scenes.json").write_text(json.dumps(scenes), encoding="utf-8")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        if _is_current(root, manifest):  # another process finished first: keep its copy
            return root
        check_synthetic_root(root)  # still ours (or empty) just before it is replaced
        if root.exists():
            stale = root.with_name(f"{tmp.name}-stale")
            os.replace(root, stale)
            shutil.rmtree(stale)
        os.replace(tmp, root)
    except OSError:
        # Another process may have put an identical dataset in place first.
        if not _is_current(root, manifest):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
