"""Model adapters (timm ViT) and the bundled reference model."""

from .timm_vit import check_supported, is_patched, model_info, patch, unpatch

__all__ = ["check_supported", "is_patched", "model_info", "patch", "unpatch"]
