"""`FusedMoRLinear`: a drop-in nn.Linear with a frozen base and trainable MoR branches."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from . import reference_layout
from .backends import BACKENDS
from .functional import mor_linear, mor_linear_with_routing
from .spec import MoRSpec, check_ranks, is_finite_real, is_integer


def _scalings(ranks: Sequence[int], alphas: Sequence[float]) -> list[float]:
    ranks = check_ranks(ranks)  # before dividing by them
    if len(alphas) != len(ranks):
        raise ValueError(
            f"alphas: expected one alpha per rank ({len(ranks)} for ranks={tuple(ranks)}), "
            f"got {len(alphas)}"
        )
    if not all(is_finite_real(a) for a in alphas):
        raise ValueError(f"alphas: expected finite numbers, got {tuple(alphas)!r}")
    return [float(a) / r for a, r in zip(alphas, ranks)]


class FusedMoRLinear(nn.Module):
    """y = x W^T + b + sum_k p_k (alpha_k / r_k) B_k A_k x, p = softmax(router(x)) per token.

    W, b are frozen; A_k, B_k and the router are trainable. With `bypass=True` the router has one
    extra output whose probability weights no branch (the "relaxed" router); `router=False` is
    plain LoRA (every branch weighted 1); `groups=G` splits the output in G equal slices, each with
    its own branches and router (qkv: groups=3).

    Set `capture_routing = True` to keep the per-token routing probabilities of the last forward
    in `last_routing`, shape (..., groups, router outputs), detached.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        ranks: Sequence[int] = (2, 4, 8),
        alphas: Sequence[float] = (4, 8, 16),
        bypass: bool = True,
        router: bool = True,
        groups: int = 1,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        for name, size in (("in_features", in_features), ("out_features", out_features)):
            if not is_integer(size) or size <= 0:
                raise ValueError(f"{name}: expected a positive integer, got {size!r}")
        self.spec = MoRSpec.build(ranks, _scalings(ranks, alphas), bypass=bypass, router=router,
                                  groups=groups)
        if out_features % groups:
            raise ValueError(f"groups: {groups} does not divide out_features={out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.alphas = tuple(alphas)
        self.backend = backend
        G, r, L = groups, self.spec.rank, self.spec.num_logits
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory),
                                   requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.lora_a = nn.Parameter(torch.empty(G * r, in_features, **factory))
        self.lora_b = nn.Parameter(torch.empty(out_features, r, **factory))
        if router:
            self.router_weight = nn.Parameter(torch.empty(G * L, in_features, **factory))
            self.router_bias = nn.Parameter(torch.empty(G * L, **factory))
        else:
            self.register_parameter("router_weight", None)
            self.register_parameter("router_bias", None)
        self.capture_routing = False
        self.last_routing: Tensor | None = None
        # qkv slices an authors' checkpoint adapted (None: all), for reference_state_dict.
        self.reference_slices: set[int] | None = None
        self.reset_parameters()

    @property
    def backend(self) -> str:
        """"auto", "torch", "triton" or "cuda"; checked when set, so a typo fails here rather
        than at the first forward. Whether it can run on the layer's device is asked per call."""
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        if name != "auto" and name not in BACKENDS:
            raise ValueError(f"backend: expected 'auto' or one of {BACKENDS}, got {name!r}")
        self._backend = name

    def reset_parameters(self) -> None:
        """Base as nn.Linear initialises it, then the adapter (see `reset_adapter_parameters`)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        self.reset_adapter_parameters()

    def reset_adapter_parameters(self) -> None:
        """As the authors: A kaiming_uniform(a=sqrt(5)), B zeros (so the layer starts equal to
        the base), router as a default nn.Linear."""
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)
        if self.router_weight is not None:
            nn.init.kaiming_uniform_(self.router_weight, a=math.sqrt(5))
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.router_bias, -bound, bound)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **config) -> "FusedMoRLinear":
        """Wrap `linear`: its weight and bias become the frozen base (shared, not copied)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        module = cls(linear.in_features, linear.out_features, linear.bias is not None,
                     device=w.device, dtype=w.dtype, **config)
        module.weight = nn.Parameter(w.detach(), requires_grad=False)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return module

    def forward(self, x: Tensor) -> Tensor:
        args = (x, self.weight, self.bias, self.lora_a, self.lora_b, self.router_weight,
                self.router_bias)
        kwargs = dict(ranks=self.spec.ranks, scalings=self.spec.scalings, bypass=self.spec.bypass,
                      groups=self.spec.groups, backend=self.backend)
        if not self.capture_routing:
            return mor_linear(*args, **kwargs)
        y, probs = mor_linear_with_routing(*args, **kwargs)
        self.last_routing = probs.detach()
        return y

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, ranks={s.ranks}, alphas={self.alphas}, "
            f"bypass={s.bypass}, router={s.router}, groups={s.groups}, backend={self.backend!r}"
        )

    def reference_state_dict(self) -> dict[str, Tensor]:
        """This layer's weights in the authors' key layout (single linear, or qkv for groups=3)."""
        return reference_layout.to_reference(self)

    def load_reference_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Load weights saved in the authors' key layout; a key or shape that does not fit raises
        an error naming it."""
        reference_layout.load_reference(self, state_dict)
