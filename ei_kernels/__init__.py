"""ei-kernels: fused MoR (mixture of LoRA ranks with a relaxed per-token router) linear layers."""

from .backends import available_backends
from .cuda_extension import cuda_extension_info
from .functional import mor_linear, mor_linear_with_routing
from .module import FusedMoRLinear
from .spec import MoRSpec
from .surgery import inject_mor, trainable_parameter_count

__all__ = [
    "FusedMoRLinear",
    "MoRSpec",
    "available_backends",
    "cuda_extension_info",
    "inject_mor",
    "mor_linear",
    "mor_linear_with_routing",
    "trainable_parameter_count",
]
