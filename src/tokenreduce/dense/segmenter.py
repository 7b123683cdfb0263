"""Segmenter with a linear decoder (Strudel et al., ICCV 2021), on any backbone tokenreduce supports.

The backbone's final tokens (after its final norm) go through one ``Linear(D → classes)`` per patch
token; the B×classes×GH×GW logits are upsampled bilinearly to the image size.  Token reduction is
applied to the backbone (``tr.apply(segmenter.backbone, method, restore="frozen")``): restoration
gives the decoder the full patch grid back.

The bundled reference segmenter is a 12-block timm ``VisionTransformer`` (width 64, 4 heads, 4×4
patches, one input channel) on 56×56 Fashion-MNIST mosaics (:mod:`tokenreduce.dense.mosaic`):
14×14 = 196 patch tokens plus a class token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from ..models import adapter_for
from ..models.reference import REFERENCE_CONFIG, data_path
from .mosaic import CANVAS, NUM_CLASSES

SEGMENTER_CONFIG: dict[str, Any] = {**REFERENCE_CONFIG, "img_size": CANVAS, "num_classes": 0}
"""Keyword arguments of the reference segmenter's backbone ``VisionTransformer``."""

WEIGHTS_FILE = "segmenter_vit.safetensors"
INFO_FILE = "segmenter_vit.json"


class LinearSegmenter(nn.Module):
    """A ViT backbone plus a per-patch linear decoder.

    Args:
        backbone: a model of a supported family (timm ``VisionTransformer``, ``Eva``, ...) whose
            ``forward_features`` returns B×N×C tokens, prefix tokens first.
        num_classes: classes of the segmentation (background included).
    """

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        adapter = adapter_for(backbone)
        self.num_prefix = adapter.model_info(backbone).num_prefix
        self.patch_size = adapter.patch_size(backbone)
        self.num_classes = num_classes
        self.head = nn.Linear(adapter.model_info(backbone).dim, num_classes)

    def patch_logits(self, images: Tensor) -> Tensor:
        """B×C×H×W images → B×classes×GH×GW logits on the patch grid.

        Raises:
            RuntimeError: the backbone returns fewer tokens than the patch grid has (a reduced backbone
                applied without ``restore=``).
        """
        b, _, h, w = images.shape
        gh, gw = h // self.patch_size[0], w // self.patch_size[1]
        tokens = self.backbone.forward_features(images)
        patches = tokens[:, self.num_prefix :]
        if patches.shape[1] != gh * gw:
            raise RuntimeError(
                f"the backbone returned {patches.shape[1]} patch tokens for a {gh}×{gw} grid: a reduced backbone "
                "must restore the full grid for dense prediction (tokenreduce.apply(..., restore='frozen'))"
            )
        return self.head(patches).transpose(1, 2).reshape(b, self.num_classes, gh, gw)

    def forward(self, images: Tensor) -> Tensor:
        """B×C×H×W images → B×classes×H×W logits (bilinear upsampling of the patch logits)."""
        logits = self.patch_logits(images)
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def build_reference_segmenter(config: dict[str, Any] | None = None) -> LinearSegmenter:
    """The reference segmenter's architecture with freshly initialised weights."""
    from ..models.reference import MEAN, STD

    backbone = VisionTransformer(**{**SEGMENTER_CONFIG, **(config or {})})
    backbone.pretrained_cfg = {"input_size": (1, CANVAS, CANVAS), "mean": (MEAN,), "std": (STD,), "crop_pct": 1.0,
                               "interpolation": "bilinear", "num_classes": 0}
    return LinearSegmenter(backbone, NUM_CLASSES)


def init_from_classifier(segmenter: LinearSegmenter, classifier: VisionTransformer) -> None:
    """Copy a classifier's backbone weights into ``segmenter`` (its head excluded), resampling the
    position embeddings to the segmenter's grid (timm's ``resample_abs_pos_embed``)."""
    from timm.layers import resample_abs_pos_embed

    state = {k: v for k, v in classifier.state_dict().items() if not k.startswith("head.")}
    grid = segmenter.backbone.patch_embed.grid_size
    state["pos_embed"] = resample_abs_pos_embed(
        state["pos_embed"], new_size=list(grid), num_prefix_tokens=classifier.num_prefix_tokens
    )
    missing, unexpected = segmenter.backbone.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("head.") for k in missing):
        raise ValueError(f"classifier weights do not fit the segmenter: missing {missing}, unexpected {unexpected}")


def segmenter_info(path: str | Path | None = None) -> dict[str, Any]:
    """The JSON record of a segmenter checkpoint (the shipped one by default)."""
    weights = data_path(WEIGHTS_FILE) if path is None else Path(path)
    return json.loads(weights.with_name(INFO_FILE).read_text())


def load_reference_segmenter(path: str | Path | None = None) -> LinearSegmenter:
    """The trained reference segmenter in eval mode (the shipped checkpoint unless ``path`` is given).

    Raises:
        FileNotFoundError: no checkpoint at ``path`` (or none shipped).
    """
    path = data_path(WEIGHTS_FILE) if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"segmenter checkpoint {path} not found (is the package installed with its data?)")
    info_path = path.with_name(INFO_FILE)
    config = json.loads(info_path.read_text()).get("config") if info_path.is_file() else None
    model = build_reference_segmenter(config)
    load_segmenter_weights(model, path)
    return model.eval()


def load_segmenter_weights(model: nn.Module, path: str | Path) -> None:
    """Load a segmenter's safetensors weights (stored in bf16 or fp32) into ``model`` as fp32."""
    from safetensors.torch import load_file

    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
