"""ei.data: annotation parsing, every bad-data error, presets, transforms, dataset, collate."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ei.data import (
    CLIP_MEAN,
    CLIP_STD,
    AnnotationError,
    DataError,
    EvalTransform,
    ImageError,
    MultimodalDataset,
    Preset,
    TrainTransform,
    balanced_indices,
    collate,
    get_preset,
    load_label_map,
    read_annotations,
    slice_indices,
)

DERM = dataclasses.replace(get_preset("derm7pt"), image_size=16)
DERM_LABELS = {name: i for i, name in enumerate(DERM.classes)}
MEAN = torch.tensor(CLIP_MEAN).view(3, 1, 1)
STD = torch.tensor(CLIP_STD).view(3, 1, 1)


def png(path, colour=(10, 20, 30), size=(24, 20)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def unnormalise(x):
    return x * STD + MEAN


@pytest.fixture
def derm_root(tmp_path):
    for i in range(4):
        png(tmp_path / f"c{i}.png", (i * 40, 0, 0))
        png(tmp_path / f"d{i}.jpg", (0, i * 40, 0))
    return tmp_path


# ---------------------------------------------------------------- parsing good files


def test_parse_good_file(tmp_path):
    text = "c0.png,d0.jpg\tMEL\n\n  \nc1.png,d1.jpg\tBCC\r\nc2.png,d2.jpg\tSK"
    ann = write(tmp_path / "a.txt", text)
    samples = read_annotations(ann, DERM_LABELS, DERM.modalities, multi_label=False)
    assert [s.paths for s in samples] == [
        (("c0.png",), ("d0.jpg",)), (("c1.png",), ("d1.jpg",)), (("c2.png",), ("d2.jpg",))
    ]
    assert [s.labels for s in samples] == [(2,), (0,), (3,)]
    assert [s.line for s in samples] == [1, 4, 5]  # blank lines skipped but counted
    assert samples[1].where == f"{ann}:4"


def test_parse_multi_image_and_multi_label(tmp_path):
    labels = {"abnormal": 0, "meniscus": 1, "acl": 2}
    ann = write(tmp_path / "a.txt", "a b  c,d,e\tacl, abnormal\nf,g,h\t\n")
    samples = read_annotations(ann, labels, ("x", "y", "z"), multi_label=True)
    assert samples[0].paths == (("a", "b", "c"), ("d",), ("e",))
    assert samples[0].labels == (2, 0)
    assert samples[1].labels == ()  # empty label field: normal


def test_label_map_file(tmp_path):
    path = write(tmp_path / "l.json", json.dumps({"b": 1, "a": 0}))
    assert load_label_map(path) == {"a": 0, "b": 1}


# ---------------------------------------------------------------- every annotation error

BAD_LINES = [
    ("c0.png,d0.jpg MEL", "no TAB"),
    ("c0.png,d0.jpg\tMEL\tNEV", "2 TABs"),
    ("c0.png\tMEL", "expected 2 modalities (clinical, dermoscopic)"),
    ("c0.png,d0.jpg,e.png\tMEL", "found 3"),
    ("c0.png, \tMEL", "modality 'dermoscopic' has no image path"),
    ("c0.png,d0.jpg\tmelanoma", "unknown label 'melanoma'; known labels: BCC, NEV, MEL, SK, MISC"),
    ("c0.png,d0.jpg\t", "exactly one label, found 0"),
    ("c0.png,d0.jpg\tMEL,NEV", "exactly one label, found 2"),
    ("c0.png,d0.jpg\tMEL,", "empty label between ','"),
]


@pytest.mark.parametrize("line,message", BAD_LINES)
def test_bad_line_names_file_and_line(tmp_path, line, message):
    ann = write(tmp_path / "bad.txt", f"c1.png,d1.jpg\tBCC\n\n{line}\n")
    with pytest.raises(AnnotationError) as err:
        read_annotations(ann, DERM_LABELS, DERM.modalities, multi_label=False)
    assert f"{ann}:3: " in str(err.value)
    assert message in str(err.value)
    assert isinstance(err.value, ValueError)


def test_lines_to_predict_may_leave_the_labels_out(tmp_path):
    ann = write(tmp_path / "new.txt", "c1.png,d1.jpg\tBCC\nc2.png,d2.jpg\n")
    samples = read_annotations(ann, DERM_LABELS, DERM.modalities, multi_label=True,
                               unlabeled=True)
    assert [s.labels for s in samples] == [(DERM_LABELS["BCC"],), ()]
    assert samples[1].paths == (("c2.png",), ("d2.jpg",))
    with pytest.raises(AnnotationError, match="new.txt:1: .*2 TABs"):  # still one TAB at most
        write(ann, "c1.png,d1.jpg\tBCC\tNEV\n")
        read_annotations(ann, DERM_LABELS, DERM.modalities, multi_label=True, unlabeled=True)


def test_duplicate_label_multi_label(tmp_path):
    ann = write(tmp_path / "a.txt", "a,b,c\tacl,acl\n")
    with pytest.raises(AnnotationError, match=r"a\.txt:1: label 'acl' listed twice"):
        read_annotations(ann, {"abnormal": 0, "meniscus": 1, "acl": 2}, "xyz", multi_label=True)


def test_a_file_that_is_not_utf8_names_its_line(tmp_path):
    ann = tmp_path / "a.txt"
    ann.write_bytes("a.png,b.png\tnevus\nc.png,d.png\tnévus\n".encode("latin-1"))
    with pytest.raises(AnnotationError, match=r"a\.txt:2: not UTF-8 text \(byte 0xe9"):
        read_annotations(ann, DERM_LABELS, DERM.modalities, multi_label=False)
    labels = tmp_path / "labels.json"
    labels.write_bytes('{"névus": 0}'.encode("latin-1"))
    with pytest.raises(AnnotationError, match=r"labels\.json:1: not UTF-8"):
        load_label_map(labels)


def test_deep_greyscale_images_keep_their_scale(tmp_path):
    """16-bit scans (OCT, X-ray) on 0..65535 and float images on [0, 1], not clipped to 8 bits;
    float values outside [0, 1] have no known scale and are refused, naming the file."""
    from ei.data.io import load_image

    sixteen = (np.arange(12 * 10).reshape(12, 10) * 500).astype(np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "scan.png")
    image = load_image(tmp_path / "scan.png")
    assert image.shape == (3, 12, 10)
    torch.testing.assert_close(image[1].double(), torch.from_numpy(sixteen / 65535.0),
                               rtol=0, atol=1e-7)
    floats = np.linspace(0, 1, 120, dtype=np.float32).reshape(12, 10)
    Image.fromarray(floats).save(tmp_path / "map.tiff")
    torch.testing.assert_close(load_image(tmp_path / "map.tiff")[2], torch.from_numpy(floats))
    Image.fromarray(floats * 4 - 1).save(tmp_path / "raw.tiff")
    with pytest.raises(ImageError, match=r"raw\.tiff: pixel values from -1 to 3 in a mode F"):
        load_image(tmp_path / "raw.tiff")


def test_empty_annotation_file(tmp_path):
    ann = write(tmp_path / "a.txt", "\n\n")
    with pytest.raises(AnnotationError, match="no samples"):
        read_annotations(ann, DERM_LABELS, DERM.modalities, multi_label=False)


@pytest.mark.parametrize("text,message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "non-empty JSON object"),
    ('{"a": 0, "b": 2}', "indices must be 0..1"),
    ('{"a": 0, "b": 0}', "indices must be 0..1"),
    ('{"a": 0, "b": "1"}', "must map a name to an int"),
    ('{"a": 0, "b": true}', "must map a name to an int"),
])
def test_bad_label_map(tmp_path, text, message):
    path = write(tmp_path / "labels.json", text)
    with pytest.raises(AnnotationError, match=message) as err:
        load_label_map(path)
    assert str(path) in str(err.value)


def test_label_map_class_count_must_match_preset(derm_root):
    ann = write(derm_root / "a.txt", "c0.png,d0.jpg\ta\n")
    message = "label map: has 2 classes, preset 'derm7pt' expects 5"
    with pytest.raises(AnnotationError, match=message):
        MultimodalDataset(ann, {"a": 0, "b": 1}, derm_root, DERM, train=False)
    # Read from a file, the error names the file.
    (derm_root / "two.json").write_text('{"a": 0, "b": 1}')
    with pytest.raises(AnnotationError, match=rf"{derm_root / 'two.json'}: has 2 classes"):
        MultimodalDataset(ann, derm_root / "two.json", derm_root, DERM, train=False)


# ---------------------------------------------------------------- image errors


def test_missing_image_fails_at_construction(derm_root):
    ann = write(derm_root / "a.txt", "c0.png,d0.jpg\tMEL\nc1.png,sub/nope.jpg\tNEV\n")
    with pytest.raises(ImageError) as err:
        MultimodalDataset(ann, None, derm_root, DERM, train=True)
    missing = derm_root / "sub" / "nope.jpg"
    assert f"{missing}: file not found (referenced by {ann}:2)" in str(err.value)
    assert isinstance(err.value, DataError)


def test_a_path_that_differs_only_in_letter_case_is_named(derm_root):
    """Annotation files written on case-insensitive disks (Derm7pt: FCL/ beside FCl/)."""
    (derm_root / "FCL").mkdir()
    (derm_root / "FCL" / "FCL067.JPG").write_bytes((derm_root / "d0.jpg").read_bytes())
    ann = write(derm_root / "a.txt", "c0.png,FCl/Fcl067.jpg\tMEL\n")
    with pytest.raises(ImageError) as err:
        MultimodalDataset(ann, None, derm_root, DERM, train=False)
    assert (f"{derm_root / 'FCl' / 'Fcl067.jpg'}: file not found; "
            f"{derm_root / 'FCL' / 'FCL067.JPG'} differs only in letter case") in str(err.value)


def test_unreadable_image_fails_at_construction(derm_root):
    (derm_root / "broken.png").write_bytes(b"this is not an image")
    ann = write(derm_root / "a.txt", "c0.png,broken.png\tMEL\n")
    with pytest.raises(ImageError, match="cannot read image") as err:
        MultimodalDataset(ann, None, derm_root, DERM, train=False)
    assert f"{derm_root / 'broken.png'}: " in str(err.value)
    assert f"{ann}:1" in str(err.value)


def test_truncated_image_fails_at_load_naming_path(derm_root):
    data = (derm_root / "c0.png").read_bytes()
    (derm_root / "cut.png").write_bytes(data[: len(data) // 2])  # header fine, pixels gone
    ann = write(derm_root / "a.txt", "cut.png,d0.jpg\tMEL\n")
    ds = MultimodalDataset(ann, None, derm_root, DERM, train=False, check_files=False)
    with pytest.raises(ImageError, match="cannot read image") as err:
        ds[0]
    assert str(derm_root / "cut.png") in str(err.value)


def test_wrong_image_count_for_preset(derm_root):
    ann = write(derm_root / "a.txt", "c0.png c1.png,d0.jpg\tMEL\n")
    with pytest.raises(AnnotationError, match=r"a\.txt:1: modality 'clinical' \(image\) needs 1"):
        MultimodalDataset(ann, None, derm_root, DERM, train=False)


def test_bad_volumes(tmp_path):
    preset = dataclasses.replace(get_preset("mrnet"), image_size=8)
    np.save(tmp_path / "flat.npy", np.zeros((4, 4), np.uint8))
    (tmp_path / "junk.npy").write_bytes(b"junk")
    np.save(tmp_path / "ok.npy", np.zeros((3, 4, 4), np.uint8))
    bad_files = [("flat.npy", "expected a volume S x H x W"), ("junk.npy", "cannot read volume")]
    for bad, message in bad_files:
        ann = write(tmp_path / "a.txt", f"ok.npy,{bad},ok.npy\tacl\n")
        with pytest.raises(ImageError, match=message) as err:
            MultimodalDataset(ann, None, tmp_path, preset, train=False)
        assert f"{tmp_path / bad}: " in str(err.value)
    ann = write(tmp_path / "a.txt", "ok.npy ok.npy,ok.npy,ok.npy\tacl\n")
    with pytest.raises(AnnotationError, match="'axial' \\(volume\\) needs 1 path"):
        MultimodalDataset(ann, None, tmp_path, preset, train=False)


# ---------------------------------------------------------------- presets


def test_presets():
    amd, mrnet = get_preset("MMC-AMD"), get_preset("mrnet")
    assert amd.modalities == ("cfp", "oct") and amd.kinds == ("image", "pick")
    assert amd.classes == ("no_amd", "dry_amd", "pcv", "wet_amd") and amd.image_size == 448
    assert get_preset("derm7pt").classes == ("BCC", "NEV", "MEL", "SK", "MISC")
    assert get_preset("derm7pt").image_size == 512
    assert mrnet.multi_label and mrnet.images_per_modality == 4 and mrnet.image_size == 256
    assert mrnet.classes == ("abnormal", "meniscus", "acl")
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        get_preset("nope")


@pytest.mark.parametrize("kwargs,message", [
    ({"kinds": ("image",)}, "1 kinds for 2 modalities"),
    ({"kinds": ("image", "video")}, "unknown kind 'video'"),
    ({"kinds": ("image", "pick"), "images_per_modality": 2}, "'pick' needs images_per_modality=1"),
    ({"modalities": ("a", "label")}, "must be unique, not"),
])
def test_bad_preset(kwargs, message):
    base = {"name": "p", "modalities": ("a", "b"), "classes": ("x", "y"), "image_size": 8}
    with pytest.raises(ValueError, match=message):
        Preset(**{**base, **kwargs})


# ---------------------------------------------------------------- transforms


def test_train_transform_shape_range_and_seed():
    images = torch.rand(4, 3, 30, 40)
    transform = TrainTransform(16)
    low, high = ((0 - MEAN) / STD).min(), ((1 - MEAN) / STD).max()
    outs = [transform(images, torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    for out in outs:
        assert out.shape == (4, 3, 16, 16) and out.dtype == torch.float32
        assert torch.isfinite(out).all()
        # Inside the normalised image of [0, 1], channel by channel.
        assert torch.all((unnormalise(out) > -1e-5) & (unnormalise(out) < 1 + 1e-5))
        assert low - 1e-5 <= out.min() and out.max() <= high + 1e-5
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


def test_train_transform_shares_parameters_across_images():
    image = torch.rand(3, 20, 20)
    out = TrainTransform(12)(torch.stack([image, image]), torch.Generator().manual_seed(5))
    assert torch.allclose(out[0], out[1])


def test_eval_transform_resizes_and_normalises():
    out = EvalTransform(8)(torch.full((1, 3, 20, 30), 0.5))
    assert out.shape == (1, 3, 8, 8)
    assert torch.allclose(out, ((0.5 - MEAN) / STD).expand(1, 3, 8, 8), atol=1e-6)


# ---------------------------------------------------------------- dataset items and batches


def test_single_label_items_and_batches(derm_root):
    text = "".join(f"c{i}.png,d{i}.jpg\t{DERM.classes[i]}\n" for i in range(4))
    ann = write(derm_root / "a.txt", text)
    labels = write(derm_root / "labels.json", json.dumps(DERM_LABELS))
    ds = MultimodalDataset(ann, labels, derm_root, DERM, train=False)
    item = ds[2]
    assert set(item) == {"clinical", "dermoscopic", "label", "index"}
    assert item["clinical"].shape == (1, 3, 16, 16) and item["clinical"].dtype == torch.float32
    assert item["label"].dtype == torch.long and item["label"].shape == () and item["label"] == 2
    assert item["index"] == 2
    # Eval: resize + normalise only, so a constant image stays the same constant.
    pixel = unnormalise(item["clinical"][0])[:, 0, 0]
    assert torch.allclose(pixel, torch.tensor([80, 0, 0]) / 255, atol=1e-6)
    batch = collate([ds[i] for i in range(3)])
    assert batch["clinical"].shape == (3, 1, 3, 16, 16)
    assert batch["label"].tolist() == [0, 1, 2] and batch["label"].dtype == torch.long
    assert batch["index"].tolist() == [0, 1, 2]
    assert ds.targets.tolist() == [0, 1, 2, 3] and ds.class_names == list(DERM.classes)


def test_training_items_reproducible_per_seed_and_epoch(derm_root):
    ann = write(derm_root / "a.txt", "".join(f"c{i}.png,d{i}.jpg\tMEL\n" for i in range(4)))
    a = MultimodalDataset(ann, None, derm_root, DERM, train=True, seed=3)
    b = MultimodalDataset(ann, None, derm_root, DERM, train=True, seed=3)
    assert torch.equal(a[1]["clinical"], b[1]["clinical"])
    assert not torch.equal(a[1]["clinical"], a[1]["dermoscopic"])  # independent per modality
    first = a[1]["clinical"]
    a.set_epoch(1)
    assert not torch.equal(first, a[1]["clinical"])
    # Independent of worker processes and batch order.
    b.set_epoch(1)
    loader = DataLoader(b, batch_size=2, num_workers=2, collate_fn=collate)
    worker_batches = torch.cat([batch["clinical"] for batch in loader])
    assert torch.equal(worker_batches, torch.stack([a[i]["clinical"] for i in range(4)]))


def test_pick_one_oct_scan(tmp_path):
    preset = dataclasses.replace(get_preset("mmc-amd"), image_size=8)
    png(tmp_path / "cfp.png")
    for k in range(5):
        png(tmp_path / f"oct{k}.png", (k * 50, k * 50, k * 50), size=(10 + k, 12))
    scans = " ".join(f"oct{k}.png" for k in range(5))
    ann = write(tmp_path / "a.txt", f"cfp.png,{scans}\tpcv\n" * 40)
    first = MultimodalDataset(ann, None, tmp_path, preset, train=False)[0]["oct"]
    assert first.shape == (1, 3, 8, 8)
    assert torch.allclose(unnormalise(first), torch.zeros(1, 3, 8, 8), atol=1e-6)
    # Training picks a B-scan at random: recover which one from the (un-jittered) mean
    # brightness, using a preset without augmentation.
    plain = dataclasses.replace(preset, augment=False)
    train = MultimodalDataset(ann, None, tmp_path, plain, train=True)
    picked = {round(unnormalise(train[i]["oct"]).mean().item() * 255 / 50) for i in range(40)}
    assert picked == {0, 1, 2, 3, 4}


def test_evaluation_can_take_the_first_scan_after_sorting_as_the_authors(tmp_path):
    preset = dataclasses.replace(get_preset("mmc-amd"), image_size=8)
    png(tmp_path / "cfp.png")
    for name, grey in (("b.png", 200), ("a.png", 100)):
        png(tmp_path / name, (grey, grey, grey))
    ann = write(tmp_path / "a.txt", "cfp.png,b.png a.png\tpcv\n")

    def evaluated_grey(p):
        item = MultimodalDataset(ann, None, tmp_path, p, train=False)[0]["oct"]
        return round(unnormalise(item).mean().item() * 255)

    assert evaluated_grey(preset) == 200  # the first as listed
    assert evaluated_grey(dataclasses.replace(preset, pick_sorted=True)) == 100  # a.png


def test_mrnet_volumes(tmp_path):
    preset = dataclasses.replace(get_preset("mrnet"), image_size=12)
    depth = 10
    values = (np.arange(depth) * 20).astype(np.uint8)
    volume = np.broadcast_to(values[:, None, None], (depth, 14, 16))
    for name in preset.modalities:
        np.save(tmp_path / f"{name}.npy", volume)
    np.save(tmp_path / "float.npy", volume.astype(np.float32) - 50)  # non-uint8: min-max scaled
    ann = write(tmp_path / "a.txt", "axial.npy,coronal.npy,sagittal.npy\tacl,abnormal\n"
                                    "axial.npy,coronal.npy,float.npy\t\n")
    ds = MultimodalDataset(ann, None, tmp_path, preset, train=False)
    item = ds[0]
    assert item["axial"].shape == (4, 3, 12, 12) and item["axial"].dtype == torch.float32
    assert ds[1]["sagittal"].dtype == torch.float32
    grey = unnormalise(item["axial"])
    assert torch.allclose(grey[:, 0], grey[:, 1], atol=1e-5)
    assert torch.allclose(grey[:, 0], grey[:, 2], atol=1e-5)
    # Centres of 4 equal segments of 10 slices: 1, 3, 6, 8.
    assert torch.allclose(grey[:, 0, 0, 0], torch.tensor([1, 3, 6, 8]) * 20 / 255, atol=1e-5)
    scaled = unnormalise(ds[1]["sagittal"])[:, 0, 0, 0]
    assert torch.allclose(scaled, torch.tensor([1, 3, 6, 8]) / 9, atol=1e-5)
    assert item["label"].dtype == torch.float32 and item["label"].tolist() == [1.0, 0.0, 1.0]
    assert ds[1]["label"].tolist() == [0.0, 0.0, 0.0]
    batch = collate([ds[0], ds[1]])
    assert batch["coronal"].shape == (2, 4, 3, 12, 12) and batch["label"].shape == (2, 3)
    assert ds.targets.tolist() == [[1, 0, 1], [0, 0, 0]]
    train = MultimodalDataset(ann, None, tmp_path, preset, train=True)
    assert train[0]["sagittal"].shape == (4, 3, 12, 12)
    assert get_preset("mrnet").image_size == 256  # the real preset size, resized on load
    full = MultimodalDataset(ann, None, tmp_path, "mrnet", train=False)[0]["axial"]
    assert full.shape == (4, 3, 256, 256)


def test_slice_indices():
    assert slice_indices(10, 4) == [1, 3, 6, 8]
    assert slice_indices(2, 4) == [0, 0, 1, 1]
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        chosen = slice_indices(10, 4, g)
        # One slice inside each quarter [0, 2.5), [2.5, 5), [5, 7.5), [7.5, 10).
        assert all(int(k * 2.5) <= s < (k + 1) * 2.5 for k, s in enumerate(chosen))


def test_balanced_indices():
    targets = np.array([0, 0, 0, 0, 0, 1, 1, 2])
    counts = np.bincount(targets[balanced_indices(targets)])
    assert counts.tolist() == [5, 5, 5]
    # Multi-label: group by the rarest positive label; no positive is its own group.
    hot = np.array([[1, 0, 0], [1, 0, 0], [1, 0, 0], [1, 1, 0], [1, 0, 1], [0, 0, 0]])
    indices = balanced_indices(hot)
    assert sorted(set(indices)) == list(range(6))
    assert indices.count(4) == 3 and indices.count(3) == 3 and indices.count(5) == 3
    assert sum(indices.count(i) for i in range(3)) == 3
