"""FusedMoRLinear, the authors' checkpoint layout, inject_mor and input validation."""

import math

import pytest
import timm
import torch
from torch import nn

from ei_kernels import FusedMoRLinear, inject_mor, mor_linear, trainable_parameter_count
from mor_reference import make_inputs, reference_mor


def _randomise(module):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)
    return module


def test_starts_equal_to_the_base_linear():
    layer = FusedMoRLinear(20, 12)
    x = torch.randn(3, 20)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert all(p.requires_grad for p in (layer.lora_a, layer.lora_b, layer.router_weight,
                                         layer.router_bias))
    assert torch.all(layer.lora_b == 0)
    bound = 1 / math.sqrt(20)
    assert layer.lora_a.abs().max() <= bound and layer.router_weight.abs().max() <= bound


def test_module_forward_equals_reference():
    layer = _randomise(FusedMoRLinear(16, 12, ranks=(2, 4), alphas=(3, 5), groups=3))
    x = torch.randn(2, 4, 16, dtype=torch.float32)
    expected = reference_mor(x, layer.weight, layer.bias, layer.lora_a, layer.lora_b,
                             layer.router_weight, layer.router_bias, ranks=(2, 4),
                             scalings=(1.5, 1.25), groups=3)
    torch.testing.assert_close(layer(x), expected)


def test_from_linear_shares_the_base_weights():
    linear = nn.Linear(10, 6)
    layer = FusedMoRLinear.from_linear(linear, ranks=(4,), alphas=(8,))
    assert layer.weight.data_ptr() == linear.weight.data_ptr()
    assert layer.bias.data_ptr() == linear.bias.data_ptr()
    x = torch.randn(4, 10)
    torch.testing.assert_close(layer(x), linear(x))


@pytest.mark.parametrize("groups", [1, 3])
def test_reference_state_dict_round_trip(groups):
    layer = _randomise(FusedMoRLinear(16, 12, groups=groups))
    sd = layer.reference_state_dict()
    suffix = "" if groups == 1 else "_q"
    assert sd[f"lora_as{suffix}.2.weight"].shape == (8, 16)
    assert sd[f"lora_bs{suffix}.1.weight"].shape == (12 // groups, 4)
    assert sd[f"route{suffix}.weight"].shape == (4, 16)
    other = FusedMoRLinear(16, 12, groups=groups)
    other.load_reference_state_dict(sd)
    x = torch.randn(3, 16)
    torch.testing.assert_close(other(x), layer(x))


def test_reference_layout_matches_the_eager_formula_branch_by_branch():
    layer = _randomise(FusedMoRLinear(8, 6))
    sd = layer.reference_state_dict()
    x = torch.randn(5, 8)
    p = torch.softmax(x @ sd["route.weight"].t() + sd["route.bias"], -1)
    y = x @ sd["linear.weight"].t() + sd["linear.bias"]
    for i, (r, a) in enumerate(zip((2, 4, 8), (4, 8, 16))):
        y = y + p[:, i + 1:i + 2] * (a / r) * (x @ sd[f"lora_as.{i}.weight"].t()
                                               @ sd[f"lora_bs.{i}.weight"].t())
    torch.testing.assert_close(layer(x), y)


def test_reference_state_dict_errors_name_the_key():
    layer = FusedMoRLinear(16, 12)
    sd = layer.reference_state_dict()
    with pytest.raises(KeyError, match="route.bias"):
        layer.load_reference_state_dict({k: v for k, v in sd.items() if k != "route.bias"})
    with pytest.raises(KeyError, match="extra.weight"):
        layer.load_reference_state_dict({**sd, "extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="lora_bs.1.weight"):
        layer.load_reference_state_dict({**sd, "lora_bs.1.weight": torch.zeros(12, 5)})
    with pytest.raises(ValueError, match="groups"):
        FusedMoRLinear(16, 12, groups=2).reference_state_dict()


def test_capture_routing_is_off_by_default():
    layer = FusedMoRLinear(16, 12, groups=3)
    layer(torch.randn(2, 3, 16))
    assert layer.last_routing is None
    layer.capture_routing = True
    layer(torch.randn(2, 3, 16))
    assert layer.last_routing.shape == (2, 3, 3, 4)
    assert not layer.last_routing.requires_grad


def test_plain_lora_and_no_bypass_layouts():
    lora = FusedMoRLinear(16, 12, router=False)
    assert lora.router_weight is None and lora.spec.num_logits == 0
    no_bypass = FusedMoRLinear(16, 12, bypass=False)
    assert no_bypass.router_weight.shape == (3, 16)
    assert "bypass=False" in repr(no_bypass)


def test_inject_mor_on_a_tiny_timm_vit():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                              patch_size=8, depth=2, num_classes=3)
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    names = inject_mor(model, targets=("fc1", "fc2", "attn.qkv"))
    assert names == [f"blocks.{i}.{n}" for i in range(2)
                     for n in ("attn.qkv", "mlp.fc1", "mlp.fc2")]
    torch.testing.assert_close(model(x), before)  # B = 0: unchanged at initialisation
    assert model.blocks[0].attn.qkv.spec.groups == 3
    d, hidden, r = 192, 768, 14

    def per_layer(k, o, groups):
        return groups * r * k + o * r + groups * 4 * (k + 1)

    expected = 2 * (per_layer(d, 3 * d, 3) + per_layer(d, hidden, 1) + per_layer(hidden, d, 1))
    assert trainable_parameter_count(model) == expected
    assert not model.head.weight.requires_grad  # every non-MoR parameter is frozen


def test_inject_mor_rejects_targets_that_match_nothing():
    with pytest.raises(ValueError, match="targets"):
        inject_mor(nn.Sequential(nn.Linear(4, 4)), targets=("fc1",))
    with pytest.raises(ValueError, match="targets"):
        inject_mor(nn.Sequential(nn.Linear(4, 4)), targets="fc1")


def _bad_call(**override):
    inputs = make_inputs((4,), 16, 12)
    kwargs = dict(ranks=(2, 4, 8), scalings=(2.0, 2.0, 2.0))
    kwargs.update({k: override.pop(k) for k in list(override) if k in ("ranks", "scalings",
                                                                        "backend", "groups")})
    inputs.update(override)
    return mor_linear(*inputs.values(), **kwargs)


@pytest.mark.parametrize("override, error, match", [
    ({"x": torch.randn(4, 15)}, ValueError, "x: expected last dimension 16"),
    ({"weight": torch.randn(12, 16, 1)}, ValueError, "weight"),
    ({"bias": torch.randn(11)}, ValueError, "bias"),
    ({"lora_a": torch.randn(13, 16)}, ValueError, "lora_a"),
    ({"lora_b": torch.randn(12, 13)}, ValueError, "lora_b"),
    ({"router_weight": torch.randn(3, 16)}, ValueError, "router_weight"),
    ({"router_bias": torch.randn(5)}, ValueError, "router_bias"),
    ({"scalings": (1.0, 2.0)}, ValueError, "scalings"),
    ({"ranks": (2, 0, 8)}, ValueError, "ranks"),
    ({"groups": 5}, ValueError, "groups"),
    ({"x": torch.ones(4, 16, dtype=torch.int64)}, TypeError, "x: expected a floating-point"),
    ({"lora_b": torch.randn(12, 14, dtype=torch.float64)}, TypeError, "lora_b: expected dtype"),
    ({"weight": torch.randn(12, 16, device="meta")}, ValueError, "weight: expected a tensor on"),
    ({"x": [[1.0] * 16]}, TypeError, "x: expected a torch.Tensor"),
    ({"backend": "fast"}, ValueError, "backend"),
])
def test_bad_input_raises_a_clear_error(override, error, match):
    with pytest.raises(error, match=match):
        _bad_call(**override)


def test_unavailable_backend_says_why():
    with pytest.raises(RuntimeError, match="cuda.*CUDA tensors"):
        _bad_call(backend="cuda")


def test_alphas_must_match_ranks():
    with pytest.raises(ValueError, match="alphas"):
        FusedMoRLinear(8, 8, ranks=(2, 4), alphas=(4,))


@pytest.mark.parametrize("ranks", [(0, 4), (2, 4, 0), (2, -1), (2.0, 4)],
                         ids=["zero-first", "zero-last", "negative", "float"])
def test_bad_ranks_are_a_clear_error_not_a_division_by_zero(ranks):
    with pytest.raises(ValueError, match="ranks: expected positive integers"):
        FusedMoRLinear(8, 8, ranks=ranks, alphas=(1.0,) * len(ranks))


def test_unknown_backend_is_refused_when_set_not_at_the_first_forward():
    with pytest.raises(ValueError, match="backend: expected 'auto' or one of"):
        FusedMoRLinear(8, 8, backend="bogus")
    layer = FusedMoRLinear(8, 8)
    with pytest.raises(ValueError, match="backend"):
        layer.backend = "tritn"
    assert layer.backend == "auto"


def test_authors_qkv_checkpoint_adapting_only_q_and_v_loads_and_writes_back():
    torch.manual_seed(0)
    source = FusedMoRLinear(16, 48, groups=3)
    torch.nn.init.normal_(source.lora_b, std=0.5)
    state = {k: v for k, v in source.reference_state_dict().items() if "_k" not in k}
    layer = FusedMoRLinear(16, 48, groups=3)
    torch.nn.init.normal_(layer.lora_b, std=0.5)  # k's B must be cleared by the load
    layer.load_reference_state_dict(state)
    x = torch.randn(5, 16)
    y, base = layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias)
    with torch.no_grad():
        expected = source(x)
    torch.testing.assert_close(y[:, :16], expected[:, :16])  # q: as the checkpoint says
    torch.testing.assert_close(y[:, 32:], expected[:, 32:])  # v
    torch.testing.assert_close(y[:, 16:32], base[:, 16:32])  # k: un-adapted
    assert sorted(layer.reference_state_dict()) == sorted(state)  # written back the same way
    # A slice with some of its keys but not all is an error naming them.
    partial = {**state, "lora_as_k.0.weight": source.reference_state_dict()["lora_as_k.0.weight"]}
    with pytest.raises(KeyError, match="lora_bs_k.0.weight"):
        FusedMoRLinear(16, 48, groups=3).load_reference_state_dict(partial)


def test_a_failed_injection_leaves_the_model_as_it_was():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, num_classes=0)
    trainable = trainable_parameter_count(vit)
    for targets, config in ((("fc_1",), {}), (("fc1",), {"ranks": (0,)})):
        with pytest.raises(ValueError, match="targets|ranks"):
            inject_mor(vit, targets, **config)
        assert trainable_parameter_count(vit) == trainable
        assert isinstance(vit.blocks[0].mlp.fc1, nn.Linear)
    # a second call adds its branches and keeps the first call's trainable
    inject_mor(vit, ("fc1",))
    first = trainable_parameter_count(vit)
    inject_mor(vit, ("fc2",))
    assert trainable_parameter_count(vit) > first
    assert vit.blocks[0].mlp.fc1.lora_a.requires_grad


@pytest.mark.parametrize("config, message", [
    ({"bypass": "no"}, "bypass: expected True or False"),
    ({"alphas": ("4", 8, 16)}, "alphas: expected finite numbers"),
    ({"in_features": -1}, "in_features: expected a positive integer"),
], ids=["bypass-string", "alpha-string", "negative-size"])
def test_bad_layer_arguments_are_named(config, message):
    sizes = {"in_features": config.pop("in_features", 8), "out_features": 6}
    with pytest.raises(ValueError, match=message):
        FusedMoRLinear(**sizes, **config)


def test_numpy_numbers_are_accepted_as_ranks_and_alphas():
    import numpy as np

    layer = FusedMoRLinear(8, 6, ranks=(np.int64(2), np.int64(4)),
                           alphas=(np.float32(4), np.float64(8)))
    assert layer.spec.ranks == (2, 4) and layer.spec.scalings == (2.0, 2.0)


def test_second_derivatives_are_refused_not_silently_wrong():
    layer = FusedMoRLinear(8, 6, backend="torch")
    x = torch.randn(5, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="create_graph=True .* is not supported"):
        torch.autograd.grad(layer(x).sum(), x, create_graph=True)
