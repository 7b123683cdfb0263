"""Token maps: which patches each reduction stage kept, pruned and merged.

One panel per stage after the input: a patch that still is its own token shows
the image; a patch whose token was pruned is greyed out; patches merged into one
token are painted together in one colour (the group's mean colour blended with a
distinct hue, ToMe-style), with the group's outline drawn.
"""

from __future__ import annotations

import colorsys
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor, nn

from .api import apply, is_reduced, last_forward, reducer
from .models import adapter_for, patch, unpatch

GREY = np.array([128, 128, 128], dtype=np.float32)


def patch_owner(source: Tensor, num_prefix: int) -> tuple[np.ndarray, np.ndarray]:
    """For every original patch: the token that stands for it (−1 if pruned) and that token's size.

    Args:
        source: N×N0 0/1 source map of one image (rows: current tokens, columns: original tokens).

    Returns:
        ``(owner, group_size)``, two int arrays of length N0 − P over the patch columns.
    """
    src = source[:, num_prefix:].float()
    present = src.sum(dim=0) > 0
    owner = src.argmax(dim=0)
    size = src.sum(dim=1)[owner]
    owner = torch.where(present, owner, torch.full_like(owner, -1))
    size = torch.where(present, size, torch.zeros_like(size))
    return owner.cpu().numpy(), size.cpu().numpy().astype(int)


def _hue(i: int) -> np.ndarray:
    r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 0.95)
    return np.array([r, g, b], dtype=np.float32) * 255


def render_token_map(image: np.ndarray, owner: np.ndarray, group_size: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Paint one stage.

    Args:
        image: H×W×3 uint8 image, exactly the model input (H = gh·ph, W = gw·pw).
        owner: token of every patch (row-major over the gh×gw grid), −1 = pruned.
        group_size: size of that token (patches it stands for).
        grid: (gh, gw).

    Returns:
        H×W×3 uint8 panel.
    """
    gh, gw = grid
    h, w = image.shape[:2]
    ph, pw = h // gh, w // gw
    out = image.astype(np.float32).copy()
    patches = out.reshape(gh, ph, gw, pw, 3)
    owner_grid = owner.reshape(gh, gw)
    cells_first = patches.transpose(0, 2, 1, 3, 4)  # gh×gw×ph×pw×3 view
    for token in np.unique(owner):
        cells = owner_grid == token
        if token < 0:
            cells_first[cells] = GREY  # pruned
        elif group_size[owner == token][0] > 1:  # merged group: one colour
            mean = cells_first[cells].reshape(-1, 3).mean(axis=0)
            cells_first[cells] = 0.5 * mean + 0.5 * _hue(int(token))
    out = patches.reshape(h, w, 3)
    # outlines of merged groups: a cell edge where the neighbour belongs to another token
    for gy in range(gh):
        for gx in range(gw):
            t = owner_grid[gy, gx]
            if t < 0 or group_size[owner == t][0] <= 1:
                continue
            y0, x0 = gy * ph, gx * pw
            if gy == 0 or owner_grid[gy - 1, gx] != t:
                out[y0, x0 : x0 + pw] = 0
            if gy == gh - 1 or owner_grid[gy + 1, gx] != t:
                out[y0 + ph - 1, x0 : x0 + pw] = 0
            if gx == 0 or owner_grid[gy, gx - 1] != t:
                out[y0 : y0 + ph, x0] = 0
            if gx == gw - 1 or owner_grid[gy, gx + 1] != t:
                out[y0 : y0 + ph, x0 + pw - 1] = 0
    return out.clip(0, 255).astype(np.uint8)


def _display_image(model: nn.Module, x: Tensor) -> np.ndarray:
    """The model input (1×C×H×W, normalised) as H×W×3 uint8, using the model's mean/std."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    c = x.shape[1]
    mean = torch.tensor(cfg.get("mean", (0.5,) * c)[:c]).view(1, c, 1, 1)
    std = torch.tensor(cfg.get("std", (0.5,) * c)[:c]).view(1, c, 1, 1)
    img = (x.cpu().float() * std + mean).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    if c == 1:
        img = img.repeat(3, axis=2)
    return (img * 255).round().astype(np.uint8)


def visualize(
    model: nn.Module,
    x: Tensor,
    method: str | None = None,
    *,
    scale: int | None = None,
    display: np.ndarray | None = None,
    **params: Any,
) -> Image.Image:
    """A PNG-ready picture of the token map after every reduction stage.

    Args:
        model: a timm ViT (a method is applied with ``trace_source=True`` if
            ``method`` is given; otherwise the model's current method is re-applied
            with source tracing).
        x: one preprocessed image, 1×C×H×W (or C×H×W) as the model takes it.
        method, params: what to apply.
        scale: integer upscaling of the panels (default: to about 224 pixels).
        display: H×W×3 uint8 image to draw on (default: ``x`` de-normalised).

    Returns:
        A PIL image: the input, then one panel per reduction stage, labelled.
    """
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.shape[0] != 1:
        raise ValueError(f"visualize takes one image, got a batch of {x.shape[0]}")
    if method is None:
        if not is_reduced(model):
            raise ValueError("visualize: give a method, or apply one to the model first")
        if params:
            raise ValueError("visualize: parameters need a method; without one the applied method is drawn as it is")
        applied = reducer(model)
        unpatch(model)  # re-patched below with the same reducer (and learned parameters), traced
        patch(model, adapter_for(model), applied, applied.name, trace_source=True)
    else:
        apply(model, method, trace_source=True, **params)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(x.to(next(model.parameters()).device))
    model.train(was_training)
    image = _display_image(model, x) if display is None else display
    panels = [("input", image), *_stage_panels(model, image, x.shape[-2:])]
    return compose(panels, scale or max(1, 224 // image.shape[0]))


def _stage_panels(model: nn.Module, image: np.ndarray, size: tuple[int, int]) -> list[tuple[str, np.ndarray]]:
    """One token-map panel per reduction stage of the last (traced) forward of ``model``."""
    record = last_forward(model)
    patch_h, patch_w = adapter_for(model).patch_size(model)
    grid = (size[0] // patch_h, size[1] // patch_w)
    panels = []
    for label, source in record.stages:
        owner, group_size = patch_owner(source[0], record.num_prefix)
        panels.append((label, render_token_map(image, owner, group_size, grid)))
    return panels


def render_mask(mask: np.ndarray) -> np.ndarray:
    """H×W class indices → H×W×3 uint8: class 0 (background) black, class c its own hue, 255 (ignore) white."""
    out = np.zeros((*mask.shape, 3), dtype=np.uint8)
    for c in np.unique(mask):
        if c == 255:
            out[mask == c] = 255
        elif c > 0:
            out[mask == c] = _hue(int(c)).astype(np.uint8)
    return out


def visualize_segmentation(
    segmenter: nn.Module,
    x: Tensor,
    method: str,
    *,
    target: Tensor | None = None,
    scale: int | None = None,
    restore: str = "frozen",
    **params: Any,
) -> Image.Image:
    """The token maps of a segmenter's backbone beside the predicted mask (and the true one).

    Args:
        segmenter: a :class:`~tokenreduce.dense.segmenter.LinearSegmenter`; ``method`` is applied to its
            backbone with source tracing and ``restore``.
        x: one preprocessed image, 1×C×H×W (or C×H×W).
        target: its H×W label map, drawn last when given.

    Returns:
        A PIL image: input, one panel per reduction stage, the reduced model's predicted mask, the truth.
    """
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.shape[0] != 1:
        raise ValueError(f"visualize takes one image, got a batch of {x.shape[0]}")
    backbone = segmenter.backbone
    apply(backbone, method, trace_source=True, restore=restore, **params)
    was_training = segmenter.training
    segmenter.eval()
    with torch.no_grad():
        pred = segmenter(x.to(next(segmenter.parameters()).device)).argmax(1)[0].cpu().numpy()
    segmenter.train(was_training)
    image = _display_image(backbone, x)
    panels = [("input", image), *_stage_panels(backbone, image, x.shape[-2:]), ("prediction", render_mask(pred))]
    if target is not None:
        panels.append(("truth", render_mask(target.cpu().numpy())))
    return compose(panels, scale or max(1, 224 // image.shape[0]))


def compose(panels: list[tuple[str, np.ndarray]], scale: int) -> Image.Image:
    """Lay panels out in a row with a label above each."""
    h, w = panels[0][1].shape[:2]
    label_h, gap = 14, 4
    sheet = Image.new("RGB", (len(panels) * (w * scale + gap) - gap, h * scale + label_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (label, arr) in enumerate(panels):
        left = i * (w * scale + gap)
        sheet.paste(Image.fromarray(arr).resize((w * scale, h * scale), Image.NEAREST), (left, label_h))
        draw.text((left + 2, 1), label, fill="black")
    return sheet
