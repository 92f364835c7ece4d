"""The EI model layer: timm ViT backbones with MoR, the single-modality and EI models, the loss.
Names are imported from their submodules on first use (ei/lazy.py)."""

from ei.lazy import lazy_namespace

__getattr__, __dir__, __all__ = lazy_namespace(__name__, {
    "aliases": ("ALIASES",),
    "backbone": ("BackboneConfig", "ViTBackbone", "build_backbone", "create_vit",
                 "load_vit_weights"),
    "checkpoint": ("load_strict", "read_state_dict"),
    "ei_model": ("EIConfig", "EIModel", "EIOutput", "IntAdapter"),
    "loss": ("EILossConfig", "ei_loss", "modality_prior"),
    "mor_config": ("MoRConfig",),
    "mor": ("apply_mor",),
    "params": ("format_parameter_report", "parameter_report"),
    "reference": ("load_reference_backbone", "load_reference_state_dict",
                  "reference_state_dict", "save_reference_backbone"),
    "single": ("SingleModalityModel",),
})
