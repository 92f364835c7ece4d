"""The EI model layer: timm ViT backbones with MoR, the single-modality and EI models, the loss."""

from .backbone import (
    ALIASES,
    BackboneConfig,
    ViTBackbone,
    build_backbone,
    create_vit,
    load_vit_weights,
)
from .checkpoint import load_strict, read_state_dict
from .ei_model import EIConfig, EIModel, EIOutput, IntAdapter
from .loss import EILossConfig, ei_loss, modality_prior
from .mor import MoRConfig, apply_mor
from .params import format_parameter_report, parameter_report
from .reference import (
    load_reference_backbone,
    load_reference_state_dict,
    reference_state_dict,
    save_reference_backbone,
)
from .single import SingleModalityModel

__all__ = [
    "ALIASES", "BackboneConfig", "ViTBackbone", "build_backbone", "create_vit", "load_vit_weights",
    "load_strict", "read_state_dict",
    "EIConfig", "EIModel", "EIOutput", "IntAdapter",
    "EILossConfig", "ei_loss", "modality_prior",
    "MoRConfig", "apply_mor",
    "format_parameter_report", "parameter_report",
    "load_reference_backbone", "load_reference_state_dict", "reference_state_dict",
    "save_reference_backbone",
    "SingleModalityModel",
]
