"""The evaluation protocols (config `protocol`, docs/REPRODUCING.md): each item against a small
case computed by hand, and every dataset config run end to end on a tiny root laid out as the
authors publish their splits (`datasplit/<split>/anno.txt`, `mapping_<name>.json`, images
elsewhere)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ei.cli import main
from ei.metrics import compute_metrics
from ei.model import EILossConfig, ei_loss
from ei.model.ei_model import EIOutput
from ei.train.config import ConfigError, load_config
from ei.train.pipeline import loss_prior_modality
from ei.train.tasks import EITask, SingleTask

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# -- the protocol settings ------------------------------------------------------------------


def test_a_protocol_sets_every_item_and_each_item_can_be_set_alone():
    ours = load_config(None).protocol
    assert (ours.scoring, ours.prior, ours.gate_target, ours.eval_pick, ours.validation) == (
        "probabilities", "train_map", "task_loss", "first", "epoch")
    paper = load_config(None, ["protocol.name=paper", "loss.best_modality=locator",
                               "protocol.scoring=probabilities"]).protocol
    assert (paper.scoring, paper.prior, paper.gate_target, paper.eval_pick,
            paper.validation, paper.schedule, paper.transforms, paper.slice_augmentation,
            paper.slice_sampling, paper.resampling) == (
        "probabilities", "fixed", "cross_entropy", "first_sorted", "interval", "cyclic",
        "authors", "per_slice", "rounded", "authors")


@pytest.mark.parametrize("overrides, message", [
    (["protocol.name=authors"], "protocol.name: expected one of ['ours', 'paper']"),
    (["protocol.scoring=softmax"], "protocol.scoring: expected one of ['probabilities', 'logits']"),
    (["protocol.prior=fixed"], "loss.best_modality: protocol.prior 'fixed' needs the modality"),
    (["loss.best_modality=locator"], "loss.best_modality: 'locator' is not used under protocol"),
])
def test_bad_protocol_settings_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, overrides)


def test_the_dataset_configs_use_the_papers_protocol_and_the_authors_split_files():
    expected = {"mmc_amd": ("oct", "mmc-amd_train_balance/anno.txt", "mapping_mmc-amd.json"),
                "derm7pt": ("dermoscopic", "derm7pt_train_balance/anno.txt",
                            "mapping_derm7pt.json"),
                "mrnet": ("sagittal", "mrnet_train_train_balance/anno.txt", "mapping_mrnet.json")}
    for name, (best, train, labels) in expected.items():
        c = load_config(CONFIGS / f"{name}.yaml", ["data.root=/images"])
        assert c.protocol.name == "paper" and c.loss.best_modality == best
        assert (c.data.train, c.data.labels) == (train, labels)
    assert load_config(CONFIGS / "synthetic.yaml").protocol.name == "ours"


# -- scoring: AP on probabilities or on logits -----------------------------------------------


def test_scoring_by_logits_ranks_samples_as_the_raw_logits_do():
    # Sample A (class 0) has logits (2, 0): p0 = 0.881; sample B (class 1) has (3, 2): p0 =
    # 0.731. By probability A ranks first for class 0 (AP 1); by logit B does (AP 1/2).
    logits = torch.tensor([[2.0, 0.0], [3.0, 2.0]])
    targets = np.array([0, 1])
    ap = {}
    for scoring in ("probabilities", "logits"):
        task = SingleTask("m", multi_label=False, scoring=scoring)
        m = compute_metrics(targets, task.scores(logits).numpy(), False, None, task.threshold)
        ap[scoring] = m["per_class"][0]["ap"]
        assert m["accuracy"] == 0.5  # argmax: A -> 0 (right), B -> 0 (wrong), either way
    assert ap == {"probabilities": 1.0, "logits": 0.5}


def test_multi_label_logits_are_thresholded_at_zero_as_probabilities_at_one_half():
    logits = torch.tensor([[0.1, -0.1]])
    for scoring in ("probabilities", "logits"):
        task = EITask(EILossConfig(multi_label=True), scoring=scoring)
        m = compute_metrics(np.array([[1, 0]]), task.scores(logits).numpy(), True, None,
                            task.threshold)
        assert m["label_accuracy"] == 1.0


# -- the gate target -----------------------------------------------------------------------


def _gate_term(gate_target: str, target: torch.Tensor) -> float:
    # Modality 0 is confident that every label is present, modality 1 that none is.
    stage2 = {"a": torch.full((1, 3), 2.0), "b": torch.full((1, 3), -2.0)}
    alpha = torch.tensor([[0.2, 0.8]])
    out = EIOutput(fused=torch.zeros(1, 3), stage1=stage2, stage2=stage2, alpha=alpha)
    config = EILossConfig(multi_label=True, gate_target=gate_target, use_aux=False)
    return ei_loss(out, target, config)[1]["gate"].item()


def test_gate_target_cross_entropy_sends_samples_without_labels_to_modality_0():
    normal = torch.zeros(1, 3)
    # BCE: modality 1 (logits -2) fits "no label" best -> -log alpha_1 = -log 0.8.
    assert _gate_term("task_loss", normal) == pytest.approx(-math.log(0.8), rel=1e-6)
    # Cross-entropy against an all-zero target is 0 for both: argmin takes modality 0.
    assert _gate_term("cross_entropy", normal) == pytest.approx(-math.log(0.2), rel=1e-6)
    # With labels both rules agree here (modality 0 says "present").
    abnormal = torch.ones(1, 3)
    assert _gate_term("cross_entropy", abnormal) == _gate_term("task_loss", abnormal)


# -- the loss prior ------------------------------------------------------------------------


def test_prior_fixed_takes_the_config_and_train_map_the_best_single_model():
    results = {"single/locator": {"train_mAP": 0.4}, "single/appearance": {"train_mAP": 0.6}}
    fixed = load_config(None, ["protocol.prior=fixed", "loss.best_modality=locator"])
    by_map = load_config(None, ["protocol.prior=train_map"])
    assert loss_prior_modality(fixed, results) == "locator"
    assert loss_prior_modality(by_map, results) == "appearance"


# -- the image pipeline, slices and position-embedding resize --------------------------------


def _images(values) -> torch.Tensor:
    """(1, 3, H, W) from nested [row][col] = (r, g, b) lists."""
    return torch.tensor(values, dtype=torch.float32).permute(2, 0, 1).unsqueeze(0)


def _still(**changes):
    from ei.data.transforms import AuthorsAugmentation

    fields = dict(degrees=0, crop=None, flip=False, contrast=1.0, brightness=1.0,
                  saturation=1.0)
    return AuthorsAugmentation(**{**fields, **changes})


def test_authors_rotation_turns_clockwise_for_positive_degrees():
    # OpenCV's getRotationMatrix2D(centre, -90) (what they call for 90) turns the picture
    # clockwise: the top-middle pixel of a 3 x 3 image ends up in the middle of the right side.
    from ei.data.transforms import AuthorsTrainTransform

    image = torch.zeros(1, 3, 3, 3)
    image[..., 0, 1] = 1.0
    out = AuthorsTrainTransform(3).apply(image, _still(degrees=90))[0, 0]
    assert out[1, 2] == pytest.approx(1.0, abs=1e-5)
    assert out.sum() == pytest.approx(1.0, abs=1e-5)


def test_authors_crop_takes_whole_pixels_off_each_side_before_the_resize():
    from ei.data.transforms import AuthorsTrainTransform

    image = torch.arange(16.0).reshape(1, 1, 4, 4).expand(1, 3, 4, 4) / 16
    # top 0, bottom 2, left 1, right 1: rows 0-1, columns 1-2, already 2 x 2.
    out = AuthorsTrainTransform(2).apply(image, _still(crop=(0, 2, 1, 1)))[0, 0] * 16
    assert out.tolist() == [[1.0, 2.0], [5.0, 6.0]]


def test_authors_colour_order_blends_with_luma_and_clips_once():
    # Their code on 0-255 values, by hand: contrast (mean luma over the image), brightness,
    # saturation (per-pixel luma), then one clip. The red of the top-left pixel leaves
    # [0, 255] after brightness and comes back within it after saturation: a clip after every
    # step would lose that.
    from ei.data.transforms import AuthorsTrainTransform

    pixels = np.array([[[240.0, 40.0, 40.0], [250.0, 240.0, 230.0]],
                       [[10.0, 20.0, 30.0], [120.0, 130.0, 140.0]]])
    c, b, s = 0.9, 1.25, 0.5
    coef = np.array([0.299, 0.587, 0.114])
    im = c * pixels + (1 - c) * (pixels * coef).sum(axis=2).mean()
    im = b * im
    assert im[0, 0, 0] > 255
    im = s * im + (1 - s) * (im * coef).sum(axis=2, keepdims=True)
    assert im[0, 0, 0] < 255
    expected = np.clip(im, 0, 255) / 255
    a = _still(contrast=c, brightness=b, saturation=s)
    out = AuthorsTrainTransform(2).apply(_images(pixels / 255), a)[0].permute(1, 2, 0)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_authors_draws_are_whole_degrees_and_pixels_in_their_ranges():
    from ei.data.transforms import AuthorsTrainTransform

    t = AuthorsTrainTransform(8)
    draws = [t.draw(50, 31, torch.Generator().manual_seed(i)) for i in range(400)]
    degrees = [a.degrees for a in draws]
    assert min(degrees) >= -180 and max(degrees) <= 179 and len(set(degrees)) > 200
    crops = [a.crop for a in draws if a.crop is not None]
    assert 150 < len(crops) < 250  # p = 0.5
    tops, bottoms, lefts, rights = zip(*crops)
    assert set(tops) | set(bottoms) == set(range(6))  # 0..int(0.1 * 50)
    assert set(lefts) | set(rights) == set(range(4))  # 0..int(0.1 * 31)


def test_authors_evaluation_resizes_without_antialiasing():
    # A 4-pixel-period stripe pattern halved by plain bilinear sampling keeps full contrast
    # at the sample points (each output pixel interpolates between two equal neighbours),
    # where an antialiased resize averages it towards grey.
    from ei.data.transforms import CLIP_MEAN, CLIP_STD, EvalTransform

    stripes = torch.tensor([1.0, 1.0, 0.0, 0.0] * 4).expand(4, 16).expand(1, 3, 4, 16)
    stripes = stripes.repeat(1, 1, 4, 1)  # 16 x 16
    def unnormalise(x):
        return x[0, 0] * CLIP_STD[0] + CLIP_MEAN[0]
    plain = unnormalise(EvalTransform(8, antialias=False)(stripes))
    ours = unnormalise(EvalTransform(8)(stripes))
    assert plain[0].tolist() == pytest.approx([1.0, 0.0] * 4, abs=1e-5)
    assert ours[0].max() < 0.9


@pytest.mark.parametrize("depth, expected", [
    (45, [6, 16, 28, 38]),  # step 11: 5.5, 16.5, 27.5, 38.5; halves round to even
    (13, [2, 4, 8, 10]),    # step 3: 1.5, 4.5, 7.5, 10.5
    (9, [1, 3, 5, 7]),      # step 2: exact
    (2, [0, 0, 1, 1]),      # step 1/4: 0.125, 0.375, 0.625, 0.875
    (1, [0, 0, 0, 0]),
], ids=["D45", "D13", "D9", "D2", "D1"])
def test_the_authors_evaluation_slices(depth, expected):
    from ei.data import slice_indices

    assert slice_indices(depth, 4, rule="rounded") == expected


def test_the_authors_training_slices_stay_within_half_a_step():
    from ei.data import slice_indices

    depth, step = 45, 11
    seen = set()
    for i in range(300):
        chosen = slice_indices(depth, 4, torch.Generator().manual_seed(i), rule="rounded")
        for k, index in enumerate(chosen):
            assert k * step <= index <= (k + 1) * step
            seen.add((k, index))
    assert len(seen) == 4 * 12  # every index of every window, 0..11 + 11 k


def _mrnet_like_item(tmp_path, per_slice: bool):
    """The training item of a volume whose 20 slices are the same picture."""
    from ei.data import MultimodalDataset, Preset

    picture = np.random.default_rng(0).integers(0, 256, (24, 24), dtype=np.uint8)
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    np.save(root / "v.npy", np.repeat(picture[None], 20, axis=0))
    (tmp_path / "anno.txt").write_text("v.npy\tabnormal\n")
    preset = Preset("mri", ("axial",), ("abnormal", "acl"), 16, multi_label=True,
                    images_per_modality=4, kinds=("volume",), transforms="authors",
                    per_slice_augmentation=per_slice, slice_sampling="rounded")
    return MultimodalDataset(tmp_path / "anno.txt", None, root, preset, train=True)[0]


def test_per_slice_augmentation_gives_each_slice_its_own_parameters(tmp_path):
    shared = _mrnet_like_item(tmp_path, per_slice=False)["axial"]
    own = _mrnet_like_item(tmp_path, per_slice=True)["axial"]
    assert all(torch.equal(shared[0], shared[k]) for k in range(1, 4))
    assert not any(torch.allclose(own[j], own[k]) for j in range(4) for k in range(j + 1, 4))


def test_resampling_authors_resizes_clip_plainly_and_dinov2_antialiased():
    from ei.train.models import pos_embed_antialias

    def antialias(backbone, resampling):
        return pos_embed_antialias(load_config(None, [f"model.backbone={backbone}",
                                                      f"protocol.resampling={resampling}"]))

    assert antialias("clip", "antialiased") and antialias("dinov2", "antialiased")
    assert not antialias("clip", "authors") and antialias("dinov2", "authors")


def test_plain_position_embedding_resize_is_bicubic_without_antialiasing(tmp_path):
    # A checkpoint of a 4 x 4 grid loaded into a 2 x 2 model: plain bicubic (align_corners
    # False) at half size samples at source columns 0.5 and 2.5, where the a = -0.75 cubic
    # kernel weighs the 4 nearest columns (-0.09375, 0.59375, 0.59375, -0.09375).
    from ei.model.backbone import create_vit

    big = create_vit("tiny", 32, embed_dim=8, depth=1, num_heads=2)  # 4 x 4
    state = big.state_dict()
    prefix = big.num_prefix_tokens if not big.no_embed_class else 0
    grid = torch.zeros(1, 16, 8)
    grid[0, :, 0] = torch.arange(4.0).repeat(4)  # channel 0 = column index
    state["pos_embed"] = torch.cat([state["pos_embed"][:, :prefix], grid], dim=1)
    torch.save(state, tmp_path / "w.pt")
    plain = create_vit("tiny", 16, embed_dim=8, depth=1, num_heads=2,  # patch 8: 2 x 2
                       checkpoint=tmp_path / "w.pt", antialias=False)
    smooth = create_vit("tiny", 16, embed_dim=8, depth=1, num_heads=2,
                        checkpoint=tmp_path / "w.pt")
    w = torch.tensor([-0.09375, 0.59375, 0.59375, -0.09375])
    # Column 0 reads source columns -1..2 (clamped to 0..2), column 1 columns 1..4 (1..3).
    expected = [float(w @ torch.tensor([0.0, 0, 1, 2])),
                float(w @ torch.tensor([1.0, 2, 3, 3]))]
    got = plain.pos_embed[0, -4:, 0].reshape(2, 2)
    assert got[0].tolist() == pytest.approx(expected, abs=1e-5)
    assert not torch.allclose(smooth.pos_embed[0, -4:, 0], plain.pos_embed[0, -4:, 0])


def test_downloaded_weights_are_resized_plainly_too(monkeypatch):
    # timm's own pretrained loading resamples with antialiasing; with antialias=False the
    # weights are loaded at their own grid and resized here. A stand-in for the download
    # gives the weights a known position embedding.
    import timm
    import torch.nn.functional as tf

    from ei.model.backbone import create_vit

    real = timm.create_model
    native_pos = {}

    def fake_create(name, pretrained=False, **kwargs):
        model = real(name, pretrained=False, **kwargs)
        if pretrained:
            with torch.no_grad():
                model.pos_embed.normal_()
            native_pos["value"] = model.pos_embed.detach().clone()
        return model

    monkeypatch.setattr(timm, "create_model", fake_create)
    vit = create_vit("tiny", 16, pretrained=True, antialias=False, embed_dim=8, depth=1,
                     num_heads=2)
    native = native_pos["value"]  # (1, side * side, 8): DINOv2 keeps no prefix position
    side = int(native.shape[1] ** 0.5)
    grid = native.reshape(1, side, side, 8).permute(0, 3, 1, 2)
    expected = tf.interpolate(grid, size=(2, 2), mode="bicubic", align_corners=False,
                              antialias=False).permute(0, 2, 3, 1).reshape(1, 4, 8)
    torch.testing.assert_close(vit.pos_embed.detach(), expected)


# -- every dataset config on the authors' layout ---------------------------------------------


def _jpg(path: Path, value: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((20, 24, 3), value, np.uint8)).save(path)
    return path.name


def _npy(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.full((6, 20, 20), value, np.uint8))


def _authors_layout(tmp_path: Path, name: str) -> tuple[Path, Path, dict]:
    """images/ and datasplit/ for dataset `name` (config file stem): a few lines per split,
    written in the format of the authors' published split files."""
    images, splits = tmp_path / "images", tmp_path / "datasplit"
    if name == "mmc_amd":
        prefix, classes = "mmc-amd", ["no_amd", "dry_amd", "pcv", "wet_amd"]
        folders = {"train": "mmc-amd_train_balance", "val": "mmc-amd_val", "test": "mmc-amd_test"}
    elif name == "derm7pt":
        prefix, classes = "derm7pt", ["BCC", "NEV", "MEL", "SK", "MISC"]
        folders = {"train": "derm7pt_train_balance", "val": "derm7pt_val", "test": "derm7pt_test"}
    else:
        prefix, classes = "mrnet", ["abnormal", "meniscus", "acl"]
        folders = {"train": "mrnet_train_train_balance", "val": "mrnet_train_val",
                   "test": "mrnet_val"}
    splits.mkdir(parents=True)
    (splits / f"mapping_{prefix}.json").write_text(
        json.dumps({c: i for i, c in enumerate(classes)}, indent=4))
    for split, folder in folders.items():
        lines = []
        for i in range(2 * len(classes)):
            label = classes[i % len(classes)]
            key = f"{split}{i}"
            if name == "mmc_amd":
                _jpg(images / "cfp-448x448" / f"f-{key}.jpg", 10 * i)
                octs = [f"oct/o-{key}_{j:03d}.jpg" for j in (1, 0)[: 1 + i % 2]]
                for j, p in enumerate(octs):
                    _jpg(images / p, 5 * i + j)
                lines.append(f"cfp-448x448/f-{key}.jpg,{' '.join(octs)}\t{label}")
            elif name == "derm7pt":
                _jpg(images / "Aaa" / f"clin-{key}.jpg", 10 * i)
                _jpg(images / "Aaa" / f"derm-{key}.jpg", 5 * i)
                lines.append(f"Aaa/clin-{key}.jpg,Aaa/derm-{key}.jpg\t{label}")
            else:
                for view in ("axial", "coronal", "sagittal"):
                    _npy(images / split / view / f"{i:04d}.npy", 10 * i)
                labels = "" if i % 4 == 3 else ",".join(classes[: 1 + i % 3])  # some normal
                paths = ",".join(f"{split}/{v}/{i:04d}.npy" for v in ("axial", "coronal",
                                                                        "sagittal"))
                lines.append(f"{paths}\t{labels}")
        (splits / folder).mkdir()
        (splits / folder / "anno.txt").write_text("\n".join(lines) + "\n")
    return images, splits, folders


TINY = ["data.image_size=16", "data.workers=0", "model.backbone=tiny", "model.pretrained=false",
        "model.timm_kwargs={embed_dim: 32, depth: 1, num_heads: 2, patch_size: 8}",
        "model.adapter_hidden=16", "single.epochs=1", "single.batch_size=4", "ei.epochs=1",
        "ei.batch_size=4", "late_fusion=false", "runtime.threads=1", "runtime.progress=false",
        "runtime.device=cpu"]


@pytest.mark.parametrize("name", ["mmc_amd", "derm7pt", "mrnet"])
def test_each_dataset_config_trains_on_the_authors_split_folder(tmp_path, name, capsys):
    images, splits, _ = _authors_layout(tmp_path, name)
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), str(CONFIGS / f"{name}.yaml"),
                 f"data.root={images}", f"data.splits={splits}", *TINY]) == 0
    result = json.loads((run / "ei" / "result.json").read_text())
    assert result["best_modality"] == load_config(
        CONFIGS / f"{name}.yaml", ["data.root=x"]).loss.best_modality
    assert math.isfinite(result["test"]["mAP"])


def test_a_missing_split_file_names_the_key_and_the_splits_folder(tmp_path, capsys):
    images, splits, folders = _authors_layout(tmp_path, "derm7pt")
    (splits / folders["val"] / "anno.txt").unlink()
    assert main(["train", "--run-dir", str(tmp_path / "run"), str(CONFIGS / "derm7pt.yaml"),
                 f"data.root={images}", f"data.splits={splits}", *TINY]) != 0
    err = capsys.readouterr().err
    assert "data.val: no file" in err and "relative to data.splits" in err
    assert not (tmp_path / "run").exists()


def test_runs_saved_before_the_protocol_setting_keep_the_choices_they_were_trained_with(
        tmp_path):
    import yaml

    from ei.train.config import Config, from_dict, read_run_config, save_config

    for best, prior in (("oct", "fixed"), (None, "train_map")):
        c = load_config(CONFIGS / "mmc_amd.yaml", ["data.root=/images",
                                                   f"loss.best_modality={best or 'null'}",
                                                   f"protocol.prior={prior}"])
        save_config(c, tmp_path / "config.yaml")
        old = yaml.safe_load((tmp_path / "config.yaml").read_text())
        del old["protocol"]
        old["data"]["eval_pick"] = "first_sorted"  # how runs of 2026-12-01 saved it
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
        p = from_dict(Config, read_run_config(tmp_path / "config.yaml")).protocol
        assert (p.scoring, p.gate_target, p.eval_pick, p.prior, p.validation) == (
            "probabilities", "task_loss", "first_sorted", prior, "epoch")


def test_protocol_items_a_saved_run_lacks_take_what_the_code_then_did(tmp_path):
    # A paper-protocol run saved before schedule, transforms, ... were choices trained as
    # "ours" does for them; its explicit epochs and min_lr stay.
    import yaml

    from ei.train.config import Config, from_dict, read_run_config, save_config

    c = load_config(CONFIGS / "mrnet.yaml", ["data.root=/images", "protocol.validation=epoch",
                                             "single.epochs=50", "single.min_lr=1e-7",
                                             "ei.epochs=50", "ei.min_lr=1e-7"])
    save_config(c, tmp_path / "config.yaml")
    old = yaml.safe_load((tmp_path / "config.yaml").read_text())
    for item in ("schedule", "transforms", "slice_augmentation", "slice_sampling", "resampling"):
        del old["protocol"][item]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    run = from_dict(Config, read_run_config(tmp_path / "config.yaml"))
    p = run.protocol
    assert (p.name, p.scoring, p.gate_target) == ("paper", "logits", "cross_entropy")
    assert (p.schedule, p.transforms, p.slice_augmentation, p.slice_sampling, p.resampling) == (
        "warmup_cosine", "ours", "per_volume", "segments", "antialiased")
    assert (run.single.epochs, run.single.min_lr, run.ei.epochs) == (50, 1e-7, 50)


def test_the_old_eval_pick_key_says_where_it_went():
    with pytest.raises(ConfigError, match="data.eval_pick: now protocol.eval_pick"):
        load_config(None, ["data.eval_pick=first"])


def _single_stage_with_the_papers_cadence(tmp_path, **single) -> tuple[list[dict], dict]:
    """(metrics.jsonl records, result.json) of the first single-modality stage of a micro run
    at batch 3: 24 training samples, so 8 iterations per epoch and a validation every
    int(24 / 3) + 1 = 9 iterations (the authors' interval: it drifts by one step per epoch)."""
    from ei.data import ensure_synthetic_dataset
    from micro_run import MICRO, write_micro_config

    root = ensure_synthetic_dataset(tmp_path / "data", **MICRO["data"]["synthetic"])
    config = write_micro_config(tmp_path, root, protocol={"validation": "interval"},
                                single={"batch_size": 3, **single}, late_fusion=False)
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), str(config)]) == 0
    stage = run / "single" / "locator"
    records = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    return records, json.loads((stage / "result.json").read_text())


def test_the_papers_cadence_validates_every_samples_over_batch_plus_one_iterations(tmp_path):
    records, result = _single_stage_with_the_papers_cadence(tmp_path, epochs=4, patience=0)
    assert [[v["iteration"] for v in r["validations"]] for r in records] == [
        [0], [9], [18], [27]]
    vals = [v for r in records for v in r["validations"]]
    best = max(vals, key=lambda v: v["mAP"])  # the first of equals, as the trainer keeps it
    assert result["best_val_mAP"] == best["mAP"]
    assert result["best_val_accuracy"] == best["accuracy"]
    assert result["best_epoch"] == 1 + best["iteration"] // 8


def test_patience_counts_validations_and_can_stop_within_an_epoch(tmp_path):
    records, result = _single_stage_with_the_papers_cadence(tmp_path, epochs=6, patience=2)
    vals = [v["mAP"] for r in records for v in r["validations"]]
    # Recount by hand: the stage stops at the 2nd validation in a row without improvement.
    best, bad, stop = -math.inf, 0, None
    for i, v in enumerate(vals):
        best, bad = (v, 0) if v > best else (best, bad + 1)
        if bad >= 2:
            stop = i
            break
    assert result["stopped_early"] == (stop is not None)
    if stop is not None:
        assert len(vals) == stop + 1  # nothing validated (or trained) after the stop
