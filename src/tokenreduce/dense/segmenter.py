"""Segmenter with a linear decoder (Strudel et al., ICCV 2021), on any backbone tokenreduce supports.

The backbone's final tokens (after its final norm) go through one linear layer per patch token.  Two
decoders:

- ``"bilinear"`` (Segmenter's linear head): ``Linear(D → classes)``, the B×classes×GH×GW logits
  upsampled bilinearly to the image size;
- ``"subpixel"``: ``Linear(D → classes·P·P)``, each patch token predicting the logits of its own P×P
  pixels (rearranged with ``pixel_shuffle``).  Still one linear map per patch, with no mixing between
  patches, but the decoder can draw boundaries inside a patch.

Token reduction is applied to the backbone (``tr.apply(segmenter.backbone, method, restore="frozen")``):
restoration gives the decoder the full patch grid back.

The bundled reference segmenter is a 12-block timm ``VisionTransformer`` (width 64, 4 heads, 4×4
patches, one input channel) with the subpixel decoder, on 56×56 Fashion-MNIST mosaics
(:mod:`tokenreduce.dense.mosaic`): 14×14 = 196 patch tokens plus a class token.
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
DECODERS = ("bilinear", "subpixel")


class LinearSegmenter(nn.Module):
    """A ViT backbone plus a per-patch linear decoder.

    Args:
        backbone: a model of a supported family (timm ``VisionTransformer``, ``Eva``, ...) whose
            ``forward_features`` returns B×N×C tokens, prefix tokens first.
        num_classes: classes of the segmentation (background included).
        decoder: ``"bilinear"`` (per-patch logits upsampled bilinearly, Segmenter's linear head) or
            ``"subpixel"`` (each patch's linear map gives the logits of its P×P pixels; square patches only).

    Raises:
        ValueError: an unknown decoder, or ``"subpixel"`` with non-square patches.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, decoder: str = "bilinear") -> None:
        super().__init__()
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, not {decoder!r}")
        self.backbone = backbone
        adapter = adapter_for(backbone)
        self.num_prefix = adapter.model_info(backbone).num_prefix
        self.patch_size = adapter.patch_size(backbone)
        if decoder == "subpixel" and self.patch_size[0] != self.patch_size[1]:
            raise ValueError(f"the subpixel decoder needs square patches, not {self.patch_size}")
        self.num_classes = num_classes
        self.decoder = decoder
        outputs = num_classes * (self.patch_size[0] * self.patch_size[1] if decoder == "subpixel" else 1)
        self.head = nn.Linear(adapter.model_info(backbone).dim, outputs)

    def patch_tokens(self, images: Tensor) -> Tensor:
        """B×C×H×W images → the backbone's B×(GH·GW)×D patch tokens, in grid order.

        Raises:
            RuntimeError: the backbone returns fewer tokens than the patch grid has (a reduced backbone
                applied without ``restore=``).
        """
        gh, gw = images.shape[-2] // self.patch_size[0], images.shape[-1] // self.patch_size[1]
        patches = self.backbone.forward_features(images)[:, self.num_prefix :]
        if patches.shape[1] != gh * gw:
            raise RuntimeError(
                f"the backbone returned {patches.shape[1]} patch tokens for a {gh}×{gw} grid: a reduced backbone "
                "must restore the full grid for dense prediction (tokenreduce.apply(..., restore='frozen'))"
            )
        return patches

    def patch_logits(self, images: Tensor) -> Tensor:
        """B×C×H×W images → the decoder's logits on the patch grid: B×classes×GH×GW (``"bilinear"``) or
        B×classes·P·P×GH×GW (``"subpixel"``, channel ``class·P·P + row·P + column``)."""
        b = images.shape[0]
        gh, gw = images.shape[-2] // self.patch_size[0], images.shape[-1] // self.patch_size[1]
        return self.head(self.patch_tokens(images)).transpose(1, 2).reshape(b, self.head.out_features, gh, gw)

    def forward(self, images: Tensor) -> Tensor:
        """B×C×H×W images → B×classes×H×W logits."""
        logits = self.patch_logits(images)
        if self.decoder == "subpixel":
            logits = F.pixel_shuffle(logits, self.patch_size[0])
            if logits.shape[-2:] == images.shape[-2:]:
                return logits
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def build_reference_segmenter(config: dict[str, Any] | None = None, decoder: str = "bilinear") -> LinearSegmenter:
    """The reference segmenter's architecture with freshly initialised weights (``config`` overrides
    :data:`SEGMENTER_CONFIG`)."""
    from ..models.reference import MEAN, STD

    backbone = VisionTransformer(**{**SEGMENTER_CONFIG, **(config or {})})
    backbone.pretrained_cfg = {"input_size": (1, CANVAS, CANVAS), "mean": (MEAN,), "std": (STD,), "crop_pct": 1.0,
                               "interpolation": "bilinear", "num_classes": 0}
    return LinearSegmenter(backbone, NUM_CLASSES, decoder=decoder)


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
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    model = build_reference_segmenter(info.get("config"), decoder=info.get("decoder", "bilinear"))
    load_segmenter_weights(model, path)
    return model.eval()


def load_segmenter_weights(model: LinearSegmenter, path: str | Path, convert_decoder: bool = False) -> None:
    """Load a segmenter's safetensors weights (stored in bf16 or fp32) into ``model`` as fp32.

    With ``convert_decoder``, a bilinear decoder's head loads into a subpixel ``model`` as its
    nearest-neighbour equivalent (every pixel of a patch gets the patch's logits): a starting point for
    training a subpixel decoder from a bilinear segmenter.
    """
    from safetensors.torch import load_file

    state = {k: v.float() for k, v in load_file(str(path)).items()}
    pixels = model.head.out_features // model.num_classes
    if convert_decoder and pixels > 1 and state["head.weight"].shape[0] == model.num_classes:
        state["head.weight"] = state["head.weight"].repeat_interleave(pixels, dim=0)
        state["head.bias"] = state["head.bias"].repeat_interleave(pixels, dim=0)
    model.load_state_dict(state)
