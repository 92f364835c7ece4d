"""ei.data.synthetic: reproducible, in annotation format, and the label needs both modalities."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ei.data import MultimodalDataset, collate, ensure_synthetic_dataset, get_preset
from ei.data.synthetic import SyntheticRootError, default_root

PRESET = get_preset("synthetic")
SMALL = {"n_train": 24, "n_val": 8, "n_test": 8}


def tree(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The dataset at its default sizes, as a user gets it."""
    root = ensure_synthetic_dataset(tmp_path_factory.mktemp("syn") / "data", seed=0)
    scenes = json.loads((root / "scenes.json").read_text())
    return root, scenes


def test_same_seed_same_bytes(tmp_path):
    a = tree(ensure_synthetic_dataset(tmp_path / "a", seed=7, **SMALL))
    b = tree(ensure_synthetic_dataset(tmp_path / "b", seed=7, **SMALL))
    c = tree(ensure_synthetic_dataset(tmp_path / "c", seed=8, **SMALL))
    assert a == b
    assert len(a) == 2 * 40 + 6  # 2 PNGs per sample, 3 splits, labels, scenes, manifest
    assert a["images/train/0000_appearance.png"] != c["images/train/0000_appearance.png"]


def test_regenerates_only_when_needed(tmp_path):
    root = ensure_synthetic_dataset(tmp_path / "d", seed=1, **SMALL)
    stamp = (root / "manifest.json").stat().st_mtime_ns
    assert ensure_synthetic_dataset(root, seed=1, **SMALL) == root
    assert (root / "manifest.json").stat().st_mtime_ns == stamp
    before = tree(root)
    ensure_synthetic_dataset(root, seed=1, **{**SMALL, "n_train": 12})
    after = tree(root)
    assert json.loads(after["manifest.json"])["sizes"]["train"] == 12
    assert after["val.txt"] == before["val.txt"]  # each split has its own random stream
    (root / "test.txt").unlink()
    ensure_synthetic_dataset(root, seed=1, **SMALL)
    assert tree(root) == before
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no temporary directories left


def test_never_replaces_a_directory_it_did_not_make(tmp_path):
    """A user's dataset given to the synthetic preset (a forgotten config file) is refused
    and left exactly as it was, whatever it holds."""
    mine = tmp_path / "my_data"
    (mine / "images").mkdir(parents=True)
    (mine / "train.txt").write_text("a.png,b.png\tmel\n")
    (mine / "labels.json").write_text('{"mel": 0}')
    (mine / "manifest.json").write_text('{"seed": 0, "version": 3}')  # someone else's manifest
    before = tree(mine)
    with pytest.raises(SyntheticRootError, match=r"my_data is not empty and was not made by"):
        ensure_synthetic_dataset(mine, **SMALL)
    assert tree(mine) == before and (mine / "images").is_dir()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(SyntheticRootError, match="is a file"):
        ensure_synthetic_dataset(a_file, **SMALL)
    assert a_file.read_text() == "x"


def test_generates_into_an_empty_directory_and_replaces_its_own_older_sets(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (ensure_synthetic_dataset(empty, **SMALL) / "train.txt").is_file()
    # A set made before the manifest carried its marker is still recognised as ours.
    manifest = json.loads((empty / "manifest.json").read_text())
    del manifest["made_by"]
    (empty / "manifest.json").write_text(json.dumps(manifest))
    root = ensure_synthetic_dataset(empty, **{**SMALL, "n_train": 12})
    assert json.loads((root / "manifest.json").read_text())["made_by"] == "ei.data.synthetic"


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.delenv("EI_SYNTHETIC_DIR", raising=False)
    assert default_root() == Path(__file__).resolve().parents[1] / "data" / "synthetic"
    monkeypatch.setenv("EI_SYNTHETIC_DIR", str(tmp_path))
    assert default_root() == tmp_path


def test_written_in_annotation_format_and_loadable(full):
    root, scenes = full
    labels = json.loads((root / "labels.json").read_text())
    assert labels == {c: i for i, c in enumerate(PRESET.classes)}
    sizes = {"train": 600, "val": 150, "test": 150}
    for split, n in sizes.items():
        lines = (root / f"{split}.txt").read_text().splitlines()
        assert len(lines) == n == len(scenes[split])
        assert lines[5] == (f"images/{split}/0005_locator.png,images/{split}/0005_appearance.png\t"
                            f"{PRESET.classes[scenes[split][5]['label']]}")
    ds = MultimodalDataset(root / "test.txt", root / "labels.json", root, PRESET, train=True)
    assert ds.targets.tolist() == [s["label"] for s in scenes["test"]]
    batch = collate([ds[i] for i in range(4)])
    assert batch["locator"].shape == batch["appearance"].shape == (4, 1, 3, 32, 32)
    with Image.open(root / "images/train/0000_locator.png") as img:
        assert img.mode == "RGB" and img.size == (32, 32)


def test_rule_in_metadata(full):
    _, scenes = full
    every = [s for split in scenes.values() for s in split]
    for s in every:
        assert sorted(s["arrangement"]) == [0, 1, 2, 3]  # every pattern shown once: no cue
        assert s["label"] == s["arrangement"][s["quadrant"]]
    # The locator's content (the quadrant) is independent of the label: chi-square test
    # of the 4 x 4 contingency table, 9 degrees of freedom, 0.1 % critical value 27.88.
    table = np.zeros((4, 4))
    for s in every:
        table[s["quadrant"], s["label"]] += 1
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    assert ((table - expected) ** 2 / expected).sum() < 27.88
    assert np.all(np.abs(table.sum(0) / len(every) - 0.25) < 0.05)


def quadrants(image):
    h = image.shape[0] // 2
    return [image[r * h:(r + 1) * h, c * h:(c + 1) * h] for r in (0, 1) for c in (0, 1)]


def locate(locator):
    """The quadrant holding the bright disk."""
    return int(np.argmax([q.mean() for q in quadrants(locator)]))


def read_patterns(appearance):
    """Which pattern is in which quadrant: the permutation that best fits edge energies."""
    energy = []
    for q in quadrants(appearance.mean(axis=2)):
        dx, dy = np.abs(np.diff(q, axis=1)).mean(), np.abs(np.diff(q, axis=0)).mean()
        # Fit of horizontal stripes, vertical stripes, checkerboard, solid.
        energy.append([dy - dx, dx - dy, dx + dy, -(dx + dy)])
    def fit(perm):
        return sum(energy[q][perm[q]] for q in range(4))

    return max(itertools.permutations(range(4)), key=fit)


def load(root, split, modality, i):
    with Image.open(root / f"images/{split}/{i:04d}_{modality}.png") as img:
        return np.asarray(img, dtype=np.float64) / 255


def test_label_needs_both_modalities(full):
    root, scenes = full
    found = {"both": [], "appearance": [], "quadrant": [], "label": []}
    for split in ("val", "test"):
        for i, s in enumerate(scenes[split]):
            quadrant = locate(load(root, split, "locator", i))
            patterns = read_patterns(load(root, split, "appearance", i))
            found["both"].append(patterns[quadrant])
            found["appearance"].append(patterns[0])  # one modality: no idea where to look
            found["quadrant"].append(quadrant)
            found["label"].append(s["label"])
    found = {k: np.array(v) for k, v in found.items()}
    # Combining both modalities with a hand-written rule recovers the label...
    assert np.mean(found["both"] == found["label"]) > 0.9
    # ...while each modality alone is at chance (25 %; 300 samples, sd 2.5 %).
    assert abs(np.mean(found["appearance"] == found["label"]) - 0.25) < 0.1
    # Locator alone: the best quadrant -> class map, fitted on the training metadata.
    train = np.zeros((4, 4))
    for s in scenes["train"]:
        train[s["quadrant"], s["label"]] += 1
    guess = train.argmax(axis=1)[found["quadrant"]]
    assert abs(np.mean(guess == found["label"]) - 0.25) < 0.1
