"""ToMe for SD — merged branches, unmerged stream (Bolya & Hoffman, CVPR-W 2023), on ViT blocks.

In each merging block the stream's patch tokens are grouped by bipartite matching (one destination
per ``stride×stride`` window of the patch grid, cosine similarity of the block's input tokens); the
attention and the MLP run on the group means, and each output row is copied back to every token of
its group before the residual add.  The stream keeps every token, so a dense head reads a full grid
in which each patch kept its own residual: the training-free method that fits dense prediction best
here (docs/segmentation.md#results).  See docs/methods.md#tome-for-sd-merged-branches.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..budget import Schedule
from ..ops.unmerge import TokenGroups, max_window_merges, square_grid, window_groups
from ..state import TokenState
from .base import (
    ModelInfo,
    Params,
    Reducer,
    boolean,
    check_layers,
    checked,
    int_at_least,
    optional,
)


def _grid(key: str, value: object) -> tuple[int, int] | None:
    if value is None:
        return None
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise ValueError(f"{key} must be (rows, columns) of the patch grid, two ints > 0, got {value!r}")
    return int(value[0]), int(value[1])


def _layers(key: str, value: object) -> tuple[int, ...] | None:
    if value is None:
        return None
    if not isinstance(value, (tuple, list)):
        raise ValueError(f"{key} must be a sequence of 0-based block indices, got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class ToMeSDParams(Params):
    """Parameters of :class:`ToMeSD`.

    Attributes:
        r: patch tokens merged away in each merging block (clamped to the sources: patches that are
            not a window's destination); ``None``: half the patch tokens, ToMe for SD's default ratio 0.5.
        layers: the 0-based merging blocks; ``None``: every block but the first and the last, which
            see the full grid (on the reference segmenter at about 0.57 of the GMACs that scores 67.5% mIoU
            on the check subset where merging in all but the first block scores 66.0%).
        stride: window side of the partition: one destination per ``stride×stride`` window (ToMe
            for SD: 2).  Destinations are the windows' top-left patches (ToMe for SD may draw them at
            random; a fixed choice keeps every image's result its own).
        grid: (rows, columns) of the patch grid; ``None``: square.
        prop_attn: proportional attention in the merged attention (``log size`` on the keys).
    """

    r: int | None = checked(None, optional(int_at_least(0)))
    layers: tuple[int, ...] | None = checked(None, _layers)
    stride: int = checked(2, int_at_least(2))
    grid: tuple[int, int] | None = checked(None, _grid)
    prop_attn: bool = checked(True, boolean)


class ToMeSD(Reducer):
    """Merged attention and MLP, unmerged back into a stream that keeps every token."""

    name = "tomesd"
    recipe = "tome"
    Params = ToMeSDParams
    knob = "r"
    paper_patches = None  # its default (half the patches) means the same on any grid
    tasks = ("segmentation",)  # a classifier reads one token: the full grid it keeps is for dense heads
    keeps_grid = True

    def __init__(self, info: ModelInfo, params: ToMeSDParams) -> None:
        super().__init__(info, params)
        depth = info.depth
        if params.layers is None:
            self.layers = tuple(range(1, depth - 1)) if depth > 2 else tuple(range(depth))
        else:
            self.layers = check_layers(self.name, params.layers, depth)
        self.grid = params.grid if params.grid is not None else square_grid(info.num_patches)
        if self.grid[0] * self.grid[1] != info.num_patches:
            raise ValueError(f"{self.name}: grid {self.grid} holds {self.grid[0] * self.grid[1]} patches, "
                             f"the model has {info.num_patches}")
        self.max_r = max_window_merges(info.num_patches, self.grid, params.stride)
        self.r = min(info.num_patches // 2 if params.r is None else params.r, self.max_r)
        self.prop_attn = params.prop_attn

    def has_groups(self, block: int) -> bool:
        return block in self.layers and self.r > 0

    def groups(self, block: int, state: TokenState) -> TokenGroups:
        """Group the patch tokens of ``state`` (B×N×C, a full grid) for block ``block``'s branches."""
        patches = state.num_tokens - state.num_prefix
        return window_groups(state.x, self.r, state.num_prefix, self._grid_of(patches), self.params.stride)

    def _grid_of(self, patches: int) -> tuple[int, int]:
        """The grid of ``patches`` patch tokens: the configured one at the model's size, else square."""
        return self.grid if patches == self.info.num_patches else square_grid(patches)

    def _merged_count(self, num_tokens: int) -> int:
        patches = num_tokens - self.info.num_prefix
        return num_tokens - min(self.r, max_window_merges(patches, self._grid_of(patches), self.params.stride))

    def schedule(self, num_tokens: int) -> Schedule:
        """Per block, the tokens its branches see: the group count in merging blocks."""
        merged = self._merged_count(num_tokens)
        return [(merged, merged) if self.has_groups(i) else (num_tokens, num_tokens) for i in range(self.info.depth)]

    def extra_macs(self, num_tokens: int) -> float:
        """An attention pool after a merging last block sees the full stream, not the groups the
        schedule's last entry counts: the difference."""
        if not self.has_groups(self.info.depth - 1):
            return 0.0
        cost = self.info.cost
        return cost.pool_macs(num_tokens) - cost.pool_macs(self._merged_count(num_tokens))

    @classmethod
    def knob_values(cls, info: ModelInfo, base: ToMeSDParams) -> range:
        grid = base.grid if base.grid is not None else square_grid(info.num_patches)
        return range(max_window_merges(info.num_patches, grid, base.stride) + 1)
