"""The Fashion-MNIST mosaic segmentation benchmark (docs/segmentation.md).

A 56×56 canvas holds a 2×2 grid of 28×28 cells.  Each cell independently holds one Fashion-MNIST
item with probability :data:`FILL_PROB`, shifted by a random offset of up to :data:`MAX_OFFSET`
pixels (clipped so the item stays on the canvas), or stays empty.  A pixel's label is the item's
class + 1 where the item's pixel is at least :data:`THRESHOLD` (of 255) and 0 (background)
elsewhere: :data:`NUM_CLASSES` = 11 classes.  Where shifted items overlap, the later cell
(row-major order) wins where its pixel is foreground, in the pixel and in the label; elsewhere the
brighter pixel is kept with its label, so every foreground pixel is labelled with the item it shows.

* The evaluation set (:func:`mosaic_testset`) is built from the 10k test images bundled with the
  package: the items are permuted with a seeded generator and used once each, cell after cell.
* Training canvases (:class:`MosaicComposer`) are composed on the fly from batches of the 60k
  training images, a new canvas every step, drawing presence, offsets and flips from torch's
  global random generator (which the training engine checkpoints, so a resumed run composes the
  same canvases).

With 4-pixel patches a canvas is 14×14 = 196 patches plus a class token: DeiT's 197 tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..models.reference import MEAN, STD, load_reference_testset

CANVAS = 56
"""Canvas side in pixels."""
CELL = 28
"""Cell side in pixels (one Fashion-MNIST item)."""
GRID = CANVAS // CELL
"""Cells per side."""
FILL_PROB = 0.8
"""Probability that a cell holds an item."""
MAX_OFFSET = 3
"""Largest shift of an item from its cell's corner, in pixels (each axis)."""
THRESHOLD = 32
"""Item pixels at or above this intensity (of 255) are foreground."""
NUM_CLASSES = 11
"""Background plus the 10 Fashion-MNIST classes."""
BACKGROUND = 0
"""Label of background pixels; an item of class ``c`` is labelled ``c + 1``."""
IGNORE_INDEX = 255
"""Label of pixels that count for no class (ADE20k's convention; the mosaic has none)."""

CLASS_NAMES = (
    "background", "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
    "Ankle boot",
)  # fmt: skip


def compose(items: Tensor, labels: Tensor, present: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor]:
    """Paste items into canvases.

    Args:
        items: uint8 B×4×28×28, one item per cell (row-major cells).
        labels: int64 B×4 item classes (0–9).
        present: bool B×4, whether the cell holds its item.
        offsets: int64 B×4×2 (dy, dx) shifts from the cell's corner; clipped so the item stays
            on the canvas.

    Returns:
        ``(canvas, target)``: uint8 B×56×56 pixels and int64 B×56×56 labels (0 = background).
    """
    b = items.shape[0]
    device = items.device
    canvas = torch.zeros(b, CANVAS, CANVAS, dtype=torch.uint8, device=device)
    target = torch.zeros(b, CANVAS, CANVAS, dtype=torch.int64, device=device)
    coords = torch.arange(CANVAS, device=device)
    for cell in range(GRID * GRID):
        corner_y, corner_x = (cell // GRID) * CELL, (cell % GRID) * CELL
        top = (corner_y + offsets[:, cell, 0]).clamp(0, CANVAS - CELL)  # B
        left = (corner_x + offsets[:, cell, 1]).clamp(0, CANVAS - CELL)
        rows = coords.view(1, CANVAS) - top.view(b, 1)  # B×56: the item row each canvas row shows
        cols = coords.view(1, CANVAS) - left.view(b, 1)
        inside = ((rows >= 0) & (rows < CELL)).unsqueeze(2) & ((cols >= 0) & (cols < CELL)).unsqueeze(1)
        inside &= present[:, cell].view(b, 1, 1)
        item = items[:, cell]  # B×28×28
        r = rows.clamp(0, CELL - 1).unsqueeze(2).expand(b, CANVAS, CANVAS)
        c = cols.clamp(0, CELL - 1).unsqueeze(1).expand(b, CANVAS, CANVAS)
        pasted = item[torch.arange(b, device=device).view(b, 1, 1), r, c].masked_fill(~inside, 0)  # B×56×56
        foreground = pasted >= THRESHOLD
        canvas = torch.where(foreground, pasted, torch.maximum(canvas, pasted))
        target = torch.where(foreground, labels[:, cell].view(b, 1, 1) + 1, target)
    return canvas, target


def preprocess(canvas: Tensor) -> Tensor:
    """uint8 B×56×56 canvases → normalised float B×1×56×56 (the Fashion-MNIST mean and std)."""
    x = canvas.reshape(canvas.shape[0], 1, *canvas.shape[-2:]).float() / 255.0
    return (x - MEAN) / STD


def mosaic_set(images: Tensor, labels: Tensor, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Canvases that use every item of ``images`` once, deterministically from ``seed``.

    Args:
        images: uint8 N×28×28; labels: int64 N.

    Returns:
        uint8 M×56×56 canvases and int64 M×56×56 labels, M ≈ N / (4 · FILL_PROB).
    """
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=gen)
    cells: list[int] = []  # item index per cell, −1 = empty
    for index in order.tolist():
        while torch.rand((), generator=gen).item() >= FILL_PROB:
            cells.append(-1)
        cells.append(index)
    while len(cells) % (GRID * GRID):
        cells.append(-1)
    cell_items = torch.tensor(cells).view(-1, GRID * GRID)  # M×4
    m = cell_items.shape[0]
    offsets = torch.randint(-MAX_OFFSET, MAX_OFFSET + 1, (m, GRID * GRID, 2), generator=gen)
    present = cell_items >= 0
    safe = cell_items.clamp(min=0)
    return compose(images[safe], labels[safe], present, offsets)


def mosaic_testset(limit: int | None = None, seed: int = 0) -> tuple[Tensor, Tensor]:
    """The evaluation set: canvases built from the bundled 10k Fashion-MNIST test images.

    Returns:
        uint8 M×56×56 canvases and int64 M×56×56 labels (M = 3,140 with ``seed=0``, or ``limit``).
    """
    images, labels = load_reference_testset()
    canvas, target = mosaic_set(images, labels, seed)
    if limit is not None:
        canvas, target = canvas[:limit], target[:limit]
    return canvas, target


class MosaicComposer:
    """Training canvases composed on the fly from batches of single items.

    Called on ``(images, labels)`` (uint8 K×28×28, int64 K with K a multiple of 4), it returns
    ``K / 4`` canvases: normalised float (K/4)×1×56×56 and int64 (K/4)×56×56 labels.  Presence,
    offsets and horizontal flips are drawn from torch's global generator.
    """

    def __init__(self, fill_prob: float = FILL_PROB, max_offset: int = MAX_OFFSET, flip: bool = True) -> None:
        self.fill_prob = fill_prob
        self.max_offset = max_offset
        self.flip = flip

    def __call__(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        k = images.shape[0]
        if k % (GRID * GRID):
            raise ValueError(f"a batch of {k} items does not fill {GRID * GRID}-cell canvases; use a multiple of 4")
        b = k // (GRID * GRID)
        items = images.reshape(b, GRID * GRID, CELL, CELL)
        if self.flip:
            flipped = torch.rand(b, GRID * GRID) < 0.5
            items = torch.where(flipped.view(b, GRID * GRID, 1, 1).to(items.device), items.flip(-1), items)
        present = (torch.rand(b, GRID * GRID) < self.fill_prob).to(items.device)
        offsets = torch.randint(-self.max_offset, self.max_offset + 1, (b, GRID * GRID, 2)).to(items.device)
        canvas, target = compose(items, labels.reshape(b, GRID * GRID), present, offsets)
        return preprocess(canvas), target
