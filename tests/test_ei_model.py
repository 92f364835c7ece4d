"""The EI model layer on tiny ViTs: shapes, gradient routing, fidelity to timm, the loss,
checkpoints (timm, original DINOv2, the authors' MoR layout), and error messages."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ei_kernels import FusedMoRLinear
from ei.model import (
    BackboneConfig,
    EIConfig,
    EILossConfig,
    EIModel,
    MoRConfig,
    SingleModalityModel,
    ViTBackbone,
    apply_mor,
    build_backbone,
    create_vit,
    ei_loss,
    load_reference_backbone,
    load_reference_state_dict,
    load_vit_weights,
    parameter_report,
    reference_state_dict,
    save_reference_backbone,
)

SIZE, CLASSES = 32, 3
TINY = BackboneConfig("tiny", SIZE)
# CLIP's layout at toy size: pre-norm, position embedding on the CLS token, no registers.
TINY_CLIP = dict(embed_dim=64, depth=3, num_heads=2, patch_size=8)


def randomise_mor(model: nn.Module, seed: int = 0) -> None:
    """Trained-looking MoR weights: B starts at zero, which would hide every router gradient
    and make the adapted layers equal their base."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FusedMoRLinear):
                m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=g) * 0.1)


def images(modalities, batch=2, count=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(batch, count, 3, SIZE, SIZE, generator=g) for m in modalities}


def ei_model(modalities=("a", "b"), seed=0, **config) -> EIModel:
    torch.manual_seed(seed)
    model = EIModel(EIConfig(modalities, CLASSES, backbone=TINY, **config))
    randomise_mor(model, seed)
    return model


@pytest.fixture(scope="module")
def model2():
    return ei_model().eval()


@pytest.mark.parametrize("modalities", [("a", "b"), ("a", "b", "c")])
@pytest.mark.parametrize("count", [1, 4])
def test_output_shapes(modalities, count):
    model = ei_model(modalities).eval()
    batch, m = 2, len(modalities)
    with torch.no_grad():
        out = model(images(modalities, batch, count), return_attention=True)
    assert out.fused.shape == (batch, CLASSES)
    assert list(out.stage1) == list(out.stage2) == list(modalities)
    assert all(v.shape == (batch, CLASSES) for v in [*out.stage1.values(), *out.stage2.values()])
    assert out.alpha.shape == (batch, m)
    torch.testing.assert_close(out.alpha.sum(1), torch.ones(batch))
    # prefix (CLS + 4 registers) + 16 patches + M-1 [INT] tokens, for each of the I images
    seq = 5 + (SIZE // 8) ** 2 + m - 1
    assert all(a.shape == (batch, count, 4, seq, seq) for a in out.attention.values())
    expected = sum(out.alpha[:, k, None] * out.stage2[t] for k, t in enumerate(modalities))
    torch.testing.assert_close(out.fused, expected)


def _reached(model: nn.Module, loss: torch.Tensor) -> set[str]:
    """Names of trainable parameters that get a non-zero gradient from `loss`."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], retain_graph=True, allow_unused=True)
    return {n for (n, _), g in zip(named, grads) if g is not None and g.abs().sum() > 0}


def _under(names: set[str], *prefixes: str) -> set[str]:
    return {n for n in names if n.startswith(prefixes)}


def test_gradient_routing():
    mods = ("a", "b", "c")
    model = ei_model(mods)
    out = model(images(mods))
    target = torch.tensor([0, 2])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # Backbones are frozen except their MoR tensors.
    classifiers = _under(trainable, *(f"aux.{m}.classifier" for m in mods))
    backbone = _under(trainable, "aux.", "main.") - classifiers
    assert backbone and all(n.rsplit(".", 1)[1] in {"lora_a", "lora_b", "router_weight",
                                                    "router_bias"} for n in backbone)

    main_a = _reached(model, F.cross_entropy(out.stage2["a"], target))
    # y_a trains main a, its head and adapters, and the auxiliary MoR of b and c through [INT];
    # not a's own auxiliary model (its tokens go to b and c), nor the gate.
    assert main_a == _under(trainable, "main.a.", "heads.a.", "adapters.a_from_",
                            "aux.b.backbone.", "aux.c.backbone.")
    assert _under(main_a, "aux.b.backbone.") == _under(backbone, "aux.b.")

    aux_a = _reached(model, F.cross_entropy(out.stage1["a"], target))
    assert aux_a == _under(trainable, "aux.a.")

    fused = _reached(model, F.cross_entropy(out.fused, target))
    gate = _reached(model, F.nll_loss(torch.log(out.alpha + 1e-8), target))
    assert fused == gate == {"gate.weight", "gate.bias"}

    total, _ = ei_loss(out, target)
    assert _reached(model, total) == trainable


def test_late_fusion_main_is_independent_of_the_auxiliary_models():
    model = ei_model(inject_layer="none")
    assert model.adapters is None and parameter_report(model)["adapters"] == 0
    out = model(images(("a", "b")))
    reached = _reached(model, out.stage2["a"].sum())
    assert reached == _under(reached, "main.a.", "heads.a.")


def test_main_backbone_without_int_equals_plain_timm():
    x = torch.randn(2, 3, SIZE, SIZE)
    for name, kwargs in [("tiny", {}), ("vit_base_patch16_clip_224.openai", TINY_CLIP)]:
        torch.manual_seed(0)
        plain = create_vit(name, SIZE, **kwargs).eval()
        adapted = copy.deepcopy(plain)
        apply_mor(adapted, MoRConfig())  # B = 0: MoR starts equal to the base layer
        backbone = ViTBackbone(adapted, SIZE).eval()
        with torch.no_grad():
            expected = plain.forward_head(plain.forward_features(x), pre_logits=True)
            torch.testing.assert_close(backbone(x), expected)


def test_int_tokens_change_cls_and_position_does_not_matter(model2):
    backbone = model2.main["a"]
    x = torch.randn(3, 3, SIZE, SIZE)
    tokens = torch.randn(3, 2, backbone.embed_dim)
    with torch.no_grad():
        alone = backbone(x)
        for layer in (0, 2):
            appended = backbone(x, tokens, inject_at=layer)
            prepended = backbone(x, tokens, inject_at=layer, prepend=True)
            assert (appended - alone).abs().max() > 1e-3
            torch.testing.assert_close(appended, prepended, atol=1e-5, rtol=1e-5)
        # After the last block the tokens cannot reach the CLS any more.
        torch.testing.assert_close(backbone(x, tokens, inject_at=backbone.depth), alone)


def test_attention_maps_match_timm(model2):
    backbone = model2.main["a"]
    last = backbone.vit.blocks[-1]
    seen = []
    hook = last.attn.attn_drop.register_forward_hook(lambda m, args, out: seen.append(out))
    last.attn.fused_attn = False  # timm's eager path materialises the weights
    try:
        with torch.no_grad():
            x = torch.randn(2, 3, SIZE, SIZE)
            _, maps = backbone(x, torch.randn(2, 1, backbone.embed_dim), return_attention=True)
    finally:
        hook.remove()
        last.attn.fused_attn = True
    torch.testing.assert_close(maps, seen[0])


def test_image_size_not_a_multiple_of_the_patch_is_padded():
    torch.manual_seed(0)
    vit = create_vit("tiny", 36).eval()
    assert tuple(vit.patch_embed.img_size) == (40, 40)
    x = torch.randn(2, 3, 36, 36)
    with torch.no_grad():
        expected = vit.forward_features(F.pad(x, (0, 4, 0, 4)))[:, 0]
        torch.testing.assert_close(ViTBackbone(vit, 36)(x), expected)


def _per_sample(logits, target, multi_label):
    if multi_label:
        return F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(1)
    return F.cross_entropy(logits, target, reduction="none")


@pytest.mark.parametrize("multi_label", [False, True])
def test_loss_matches_the_spec(model2, multi_label):
    mods = ("a", "b")
    with torch.no_grad():
        out = model2(images(mods, batch=4))
    target = (torch.tensor([[1.0, 0, 1], [0, 0, 0], [0, 1, 0], [1, 1, 1]]) if multi_label
              else torch.tensor([0, 1, 2, 1]))
    config = EILossConfig(multi_label=multi_label, best_modality="b")
    total, terms = ei_loss(out, target, config)

    main = torch.stack([_per_sample(out.stage2[m], target, multi_label) for m in mods], 1)
    aux = sum(_per_sample(out.stage1[m], target, multi_label).mean() for m in mods)
    best = (main * torch.tensor([1.0, 1e-3])).argmin(1)
    gate = F.nll_loss(torch.log(out.alpha + 1e-8), best)
    fused = _per_sample(out.fused, target, multi_label).mean()
    expected = fused + main.mean(0).sum() + 0.3 * aux + 0.1 * gate
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(terms["gate"], gate)
    torch.testing.assert_close(terms["aux"], aux)
    assert set(terms) == {"fused", "main", "aux", "gate", "main/a", "main/b", "aux/a", "aux/b"}
    assert not any(t.requires_grad for t in terms.values())

    total, terms = ei_loss(out, target, EILossConfig(multi_label=multi_label, use_aux=False,
                                                     use_gate=False))
    assert set(terms) == {"fused", "main", "main/a", "main/b"}
    torch.testing.assert_close(total, fused + main.mean(0).sum())


def test_loss_rejects_the_wrong_target_form(model2):
    with torch.no_grad():
        out = model2(images(("a", "b")))
    with pytest.raises(ValueError, match="multi-label"):
        ei_loss(out, torch.tensor([0, 1]), EILossConfig(multi_label=True))
    with pytest.raises(ValueError, match="class indices"):
        ei_loss(out, torch.zeros(2, CLASSES))
    with pytest.raises(KeyError, match="best_modality"):
        ei_loss(out, torch.tensor([0, 1]), EILossConfig(best_modality="x"))


def _eager_mor_linear():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "eager_mor.py"
    spec = importlib.util.spec_from_file_location("eager_mor", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.EagerMoRLinear


def test_loads_the_authors_layout():
    """A ViT built with authors-style MoR layers saves the authors' layout; our backbone
    loads it and computes the same features."""
    eager_cls = _eager_mor_linear()
    torch.manual_seed(0)
    authors = create_vit("tiny", SIZE).eval()
    for block in authors.blocks:
        for name in ("fc1", "fc2"):
            base = getattr(block.mlp, name)
            layer = eager_cls(base.in_features, base.out_features)
            layer.linear.load_state_dict(base.state_dict())
            for b in layer.lora_bs:
                nn.init.normal_(b.weight, std=0.1)
            setattr(block.mlp, name, layer)
    state = authors.state_dict()
    for key in ("blocks.0.mlp.fc1.lora_as.0.weight", "blocks.0.mlp.fc1.route.weight",
                "blocks.0.mlp.fc1.linear.weight"):
        assert key in state

    torch.manual_seed(1)
    ours = build_backbone(TINY).eval()
    load_reference_state_dict(ours, {"model." + k: v for k, v in state.items()}, prefix="model.")
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), authors.forward_features(x)[:, 0])
    assert reference_state_dict(ours).keys() == state.keys()


def test_reference_layout_round_trip_with_qkv(tmp_path):
    config = BackboneConfig("tiny", SIZE, mor=MoRConfig(targets=("qkv", "fc1", "fc2", "proj")))
    torch.manual_seed(0)
    source = build_backbone(config).eval()
    randomise_mor(source)
    assert "blocks.1.attn.qkv.route_k.weight" in reference_state_dict(source)
    save_reference_backbone(source, tmp_path / "mor.pth")
    torch.manual_seed(1)
    target = build_backbone(config).eval()
    load_reference_backbone(target, tmp_path / "mor.pth")
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x))


def test_reference_checkpoint_that_does_not_fit():
    backbone = build_backbone(TINY)
    state = reference_state_dict(backbone)
    bad = dict(state)
    del bad["blocks.2.mlp.fc2.route.bias"]
    with pytest.raises(KeyError, match=r"blocks\.2\.mlp\.fc2.*route\.bias"):
        load_reference_state_dict(backbone, bad)
    bad = dict(state, **{"blocks.0.norm1.weight": torch.ones(7)})
    with pytest.raises(ValueError, match=r"blocks\.0\.norm1\.weight"):
        load_reference_state_dict(backbone, bad)
    bad = dict(state, extra=torch.ones(1))
    with pytest.raises(KeyError, match="extra"):
        load_reference_state_dict(backbone, bad)
    lora = build_backbone(BackboneConfig("tiny", SIZE, mor=MoRConfig(mode="lora")))
    with pytest.raises(KeyError, match="route"):
        load_reference_state_dict(lora, state)


def _openai_clip_layout(state: dict) -> dict:
    """A timm CLIP ViT's state dict in OpenAI's original layout (the inverse of timm's filter),
    with a projection head and a text tower that loading must ignore."""
    swaps = [("patch_embed.proj", "conv1"), ("blocks.", "transformer.resblocks."),
             ("norm_pre", "ln_pre"), ("attn.qkv.", "attn.in_proj_"), ("attn.proj", "attn.out_proj"),
             ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"), ("norm1", "ln_1"),
             ("norm2", "ln_2")]
    out = {"visual.proj": torch.randn(64, 16), "token_embedding.weight": torch.randn(10, 16)}
    for key, value in state.items():
        if key == "cls_token":
            key, value = "class_embedding", value.reshape(-1)
        elif key == "pos_embed":
            key, value = "positional_embedding", value[0]
        elif key.startswith("norm."):
            key = "ln_post." + key[len("norm."):]
        for timm_name, openai_name in swaps:
            key = key.replace(timm_name, openai_name)
        out["visual." + key] = value
    return out


def test_timm_and_original_checkpoints(tmp_path):
    x = torch.randn(2, 3, SIZE, SIZE)
    torch.manual_seed(0)
    dinov2 = create_vit("tiny", SIZE).eval()
    state = dinov2.state_dict()
    torch.save({"state_dict": state}, tmp_path / "timm.pth")
    # The original DINOv2 layout: registers as register_tokens, a position embedding entry for
    # the CLS token, a mask token; timm's filter converts it back.
    original = {k: v for k, v in state.items() if k not in ("reg_token", "pos_embed")}
    original.update(register_tokens=state["reg_token"], mask_token=torch.zeros(1, 64),
                    pos_embed=torch.cat([torch.zeros(1, 1, 64), state["pos_embed"]], 1))
    torch.save(original, tmp_path / "dinov2.pth")
    clip = create_vit("clip", SIZE, **TINY_CLIP).eval()
    torch.save(_openai_clip_layout(clip.state_dict()), tmp_path / "clip.pth")
    for name, kwargs, source, file in [("tiny", {}, dinov2, "timm.pth"),
                                       ("tiny", {}, dinov2, "dinov2.pth"),
                                       ("clip", TINY_CLIP, clip, "clip.pth")]:
        loaded = create_vit(name, SIZE, checkpoint=tmp_path / file, **kwargs).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded.forward_features(x), source.forward_features(x))
    with pytest.raises(KeyError, match="checkpoint"):
        load_vit_weights(create_vit("tiny", SIZE, depth=3), tmp_path / "timm.pth")


def test_ei_from_single_models(tmp_path):
    torch.manual_seed(0)
    singles = {m: SingleModalityModel.build(TINY, CLASSES) for m in ("a", "b")}
    for s in singles.values():
        randomise_mor(s)
    torch.save(singles["b"].state_dict(), tmp_path / "b.pth")
    config = EIConfig(("a", "b"), CLASSES, backbone=TINY)
    model = EIModel.from_single(config, {"a": singles["a"], "b": tmp_path / "b.pth"})
    x = images(("a", "b"), count=2)
    with torch.no_grad():
        for m, single in singles.items():
            torch.testing.assert_close(model.aux[m](x[m]), single(x[m]))
            flat = x[m].flatten(0, 1)
            torch.testing.assert_close(model.main[m](flat), single.backbone(flat))
            assert not torch.equal(model.heads[m].weight, single.classifier.weight)
    with pytest.raises(KeyError, match="'b'"):
        EIModel.from_single(config, {"a": singles["a"]})
    other = SingleModalityModel.build(TINY, CLASSES + 1)
    with pytest.raises(ValueError, match="single-modality model of 'a'.*classifier"):
        EIModel.from_single(config, {"a": other, "b": singles["b"]})


def test_input_errors_name_the_modality(model2):
    x = images(("a", "b"))
    with pytest.raises(KeyError, match="'b'"):
        model2({"a": x["a"]})
    with pytest.raises(ValueError, match=r"images\['b'\].*\(B, I, 3, 32, 32\)"):
        model2({"a": x["a"], "b": torch.randn(2, 1, 3, 24, 24)})
    with pytest.raises(ValueError, match=r"images\['a'\]"):
        model2({"a": x["a"][0], "b": x["b"]})
    with pytest.raises(ValueError, match="batch size"):
        model2({"a": x["a"], "b": x["b"][:1]})
    with pytest.raises(ValueError, match="inject_layer"):
        EIModel(EIConfig(("a", "b"), CLASSES, backbone=TINY, inject_layer=5))


def test_config_from_yaml_style_dicts_and_ablations():
    config = EIConfig(
        modalities=["a", "b"], num_classes=CLASSES, inject_layer="none",
        backbone={"name": "tiny", "img_size": SIZE, "mor": {"mode": "lora", "targets": ["fc1"]}},
    )
    assert config.late_fusion and config.backbone.mor.targets == ("fc1",)
    model = EIModel(config)
    layers = [m for m in model.modules() if isinstance(m, FusedMoRLinear)]
    assert len(layers) == 4 * 4 and all(m.router_weight is None for m in layers)

    frozen = EIModel(EIConfig(("a", "b"), CLASSES, backbone=BackboneConfig(
        "tiny", SIZE, mor=MoRConfig(mode="none"))))
    report = parameter_report(frozen)
    assert report["mor"] == 0 and report["other"] == 0
    assert report["trainable"] == report["adapters"] + report["heads"] + report["gate"]

    no_bypass = build_backbone(BackboneConfig("tiny", SIZE, mor=MoRConfig(bypass=False)))
    assert no_bypass.vit.blocks[0].mlp.fc1.router_weight.shape[0] == 3


def test_parameter_report(model2):
    report = parameter_report(model2)
    mor = sum(p.numel() for m in model2.modules() if isinstance(m, FusedMoRLinear)
              for p in m.parameters() if p.requires_grad)
    assert report["mor"] == mor
    assert report["gate"] == 64 * 2 * 2 + 2
    assert report["heads"] == 4 * (64 * CLASSES + CLASSES)  # aux classifiers + main heads
    assert report["adapters"] == 2 * (2 * 64 + 64 * 384 + 384 + 384 * 64 + 64)
    assert report["other"] == 0
    assert report["trainable"] == sum(p.numel() for p in model2.parameters() if p.requires_grad)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = build_backbone(TINY)
    randomise_mor(plain)
    ckpt = copy.deepcopy(plain)
    ckpt.vit.set_grad_checkpointing(True)
    x = torch.randn(2, 3, SIZE, SIZE)
    tokens = torch.randn(2, 1, 64)
    grads = []
    for backbone in (plain, ckpt):
        backbone(x, tokens).square().sum().backward()
        grads.append([p.grad for p in backbone.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_weights_that_cannot_be_fetched_say_how_to_load_a_local_file(monkeypatch):
    import timm

    from ei.model.backbone import create_vit

    real = timm.create_model

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("cannot reach the hub")  # as huggingface_hub's errors offline
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(OSError, match=r"could not be fetched \(cannot reach the hub\); .*"
                                      r"model\.checkpoint=FILE"):
        create_vit("vit_tiny_patch16_224", 32, pretrained=True)
