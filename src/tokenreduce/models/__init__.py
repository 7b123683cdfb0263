"""Model families (one adapter module each) and the bundled reference model.

:func:`adapter_for` finds the adapter of a live model from its class; :func:`model_info`,
:func:`check_supported` go through it.  The adapter interface is :mod:`tokenreduce.models.base`.
"""

from __future__ import annotations

from torch import nn

from ..methods.base import ModelInfo
from .base import FamilyAdapter, context_of, is_patched, patch, unpatch
from .hf_clip import HFCLIPVision, HFSiglipVision
from .hf_vit import HFDeiT, HFDinov2, HFViT
from .timm_eva import TimmEva
from .timm_vit import TimmViT

ADAPTERS: list[type[FamilyAdapter]] = [TimmViT, TimmEva, HFViT, HFDeiT, HFDinov2, HFCLIPVision, HFSiglipVision]
"""The supported families, tried in order (the first whose ``matches`` accepts the model)."""


def adapter_for(model: nn.Module) -> type[FamilyAdapter]:
    """The adapter of ``model``'s family, after checking that its configuration is supported.

    Raises:
        TypeError: no family matches (the message lists the supported ones), or the family does not
            support this configuration.
    """
    if is_patched(model):
        return model._tr_ctx.adapter
    for adapter in ADAPTERS:
        if adapter.matches(model):
            adapter.check_supported(model)
            return adapter
    families = "; ".join(f"{a.name}: {a.description}" for a in ADAPTERS)
    raise TypeError(f"tokenreduce cannot adapt {type(model).__name__}; supported families: {families}")


def check_supported(model: nn.Module) -> None:
    """Raise ``TypeError`` naming the supported families if ``model`` cannot be adapted."""
    adapter_for(model)


def model_info(model: nn.Module) -> ModelInfo:
    """The facts a reducer may use about ``model`` (its family's adapter reads them)."""
    return adapter_for(model).model_info(model)


def timm_data_config(model: nn.Module, overrides: dict | None = None) -> dict:
    """timm's data config for ``model`` (input size, crop, interpolation, mean/std), for reading images
    through timm's pipeline; the model's family decides it (a Hugging Face model's comes from its image
    processor's settings, :func:`tokenreduce.models.hf.processor_data_config`).

    Raises:
        ValueError: the family cannot say how to read images for this model (the message says why).
    """
    return adapter_for(model).data_config(model, overrides)


__all__ = [
    "ADAPTERS", "FamilyAdapter", "adapter_for", "check_supported", "context_of", "is_patched", "model_info", "patch",
    "timm_data_config", "unpatch",
]
