"""PPT — Token Pruning & Pooling Transformers (Wu et al., 2023; arXiv 2310.01812).

Inside blocks ``layers`` (default 3, 6, 9), after the attention residual, every
image removes the same ``r`` tokens (``r`` capped at ``(N − P) // 2``) by one of
two policies chosen per image from its importance scores (docs/methods.md#ppt):

* score of patch token i: ``(Σ_h A_h[0, i]) · ‖v_i‖₂`` — the class token's
  attention (softmax including the ``log size`` bias) summed over heads, times
  the norm of the value vector concatenated over heads — normalised to sum 1
  over the patch tokens;
* if the unbiased variance (float32) of an image's scores is below
  ``threshold`` the scores look flat and the image is **pooled**: ToMe
  bipartite matching on the head-averaged keys with a size-weighted merge;
* otherwise it is **pruned**: the ``N − P − r`` highest-scoring patch tokens
  are kept (after the prefix tokens, in descending score order) with their
  sizes; the others and their sizes are dropped.

Proportional attention (``log size`` on the keys) is on in every block by
default.  Mixed batches are handled without a loop over images: both candidate
outputs are computed for the whole batch (same shape B×(N−r)×C) and each image
takes one of them with ``torch.where`` — hidden states, sizes and sources alike,
so source tracing is right for mixed batches (the official code's sub-batch
write-back is not).  In eager mode a batch whose images all take the same branch
computes only that one (one host synchronisation per reduction block); a traced
graph (``torch.compile``, export) always holds both.

Deviations from the official code (ppt_deit.py's ``pp_block_adaptive`` and
``PPTAttention``), by design:

* all ``P`` prefix tokens are protected on both paths (the official prune path
  protects the class token only);
* with ``prop_attn=False`` the official code resets the sizes to ones at every
  reduction block, so pooling merges with unit weights and pruning carries unit
  sizes; ours keeps the true running sizes (docs/methods.md#token-sizes-and-source-maps) for the merge weights and
  bookkeeping and only drops the ``log size`` attention bias;
* the official importance score is taken from the attention *after* attention
  dropout, ours before it; the two are identical when ``attn_drop = 0`` (as in
  DeiT) and at inference.

The threshold depends on the model, the token count and the layer (normalised
scores have mean ``1/(N−P)``); :func:`tokenreduce.calibrate` picks one from data.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..budget import Schedule, in_block_schedule
from ..ops.attention import AttentionNeeds, AttentionSignals
from ..ops.matching import max_merges
from ..ops.merge import bipartite_merge
from ..ops.modes import tracing
from ..ops.prune import keep_topk
from ..state import TokenState, select
from .base import (
    ModelInfo,
    Params,
    Reducer,
    block_indices,
    boolean,
    check_layers,
    checked,
    int_at_least,
    merge_count_values,
    numbers_in,
)

Threshold = float | tuple[float, ...]


@dataclass(frozen=True)
class PPTParams(Params):
    """Parameters of :class:`PPT`.

    Attributes:
        r: tokens removed at each reduction block (``r_tokens``; capped at
            ``(N − P) // 2``).  Official DeiT-S setting: 50.
        layers: 0-based reduction blocks (the paper's ``pp_loc_list``).
        threshold: variance threshold τ below which an image is pooled: one float
            for all layers, or one per entry of ``layers`` (in the order given).
            7e-5 is the official off-the-shelf DeiT-S (197 tokens) value; for other
            models or image sizes use :func:`tokenreduce.calibrate`.
        prop_attn: proportional attention (``log size`` key bias) in every block.
    """

    r: int = checked(50, int_at_least(0))
    layers: tuple[int, ...] = checked((3, 6, 9), block_indices)
    threshold: Threshold = checked(7e-5, numbers_in(0.0, float("inf")))
    prop_attn: bool = checked(True, boolean)


def importance_scores(cls_attn: Tensor, values: Tensor, num_prefix: int) -> Tensor:
    """PPT's (ATS's) normalised importance of the patch tokens.

    Args:
        cls_attn: B×H×N class-token attention (softmax row of query 0).
        values: B×H×N×d value vectors.
        num_prefix: P protected leading tokens (not scored).

    Returns:
        B×(N−P) float32 scores ``(Σ_h A_h[0, i]) · ‖v_i‖₂``, normalised to sum 1 per image.
    """
    attn = cls_attn.float().sum(dim=1)  # B×N
    v_norm = values.float().pow(2).sum(dim=(1, 3)).sqrt()  # B×N, ‖v‖ over heads × head_dim
    scores = (attn * v_norm)[:, num_prefix:]
    return scores / scores.sum(dim=-1, keepdim=True)


def select_state(choose_first: Tensor, first: TokenState, second: TokenState) -> TokenState:
    """Per image, ``first`` where ``choose_first`` (B bool) else ``second``; both B×N' with equal shapes.

    Sizes are materialised; every other per-token tensor of the state (sources when
    traced, owner maps and archives of restoration, ...) is selected the same way
    (:func:`tokenreduce.state.select`).
    """
    return select(choose_first, first, second)


class PPT(Reducer):
    """Per-image pooling (ToMe merge) or pruning (top score), chosen by score variance."""

    name = "ppt"
    recipe = "ppt"
    Params = PPTParams
    knob = "r"

    def __init__(self, info: ModelInfo, params: PPTParams) -> None:
        super().__init__(info, params)
        self.layers = check_layers(self.name, params.layers, info.depth)
        self.thresholds = _layer_thresholds(params.layers, params.threshold)
        self.prop_attn = params.prop_attn
        self.recorded: dict[int, list[Tensor]] | None = None

    # -- calibration support --------------------------------------------------------
    def start_recording(self) -> None:
        """Record every image's score variance at each reduction block (see :func:`tokenreduce.calibrate`)."""
        self.recorded = {block: [] for block in self.layers}

    def stop_recording(self) -> dict[int, Tensor]:
        """Stop recording; per block the recorded variances of all images, float32 on CPU."""
        recorded, self.recorded = self.recorded or {}, None
        return {block: torch.cat(v).cpu() if v else torch.empty(0) for block, v in recorded.items()}

    # -- the forward hooks ----------------------------------------------------------
    def removed(self, num_tokens: int) -> int:
        return min(self.params.r, max_merges(num_tokens, self.info.num_prefix))

    def needs(self, block: int) -> AttentionNeeds | None:
        if block not in self.layers:
            return None
        # the keys per head: the merge averages them itself, and a batch that only prunes never does
        return AttentionNeeds(head_keys=True, cls_attn=True, values=True)

    def reduce(self, block: int, state: TokenState, signals: AttentionSignals) -> TokenState:
        p, n = state.num_prefix, state.num_tokens
        r = self.removed(n)
        if r <= 0:
            return state
        scores = importance_scores(signals.cls_attn, signals.values, p)
        variance = scores.var(dim=-1)
        if self.recorded is not None:
            self.recorded[block].append(variance.detach())
        pool = variance < self.thresholds[block]
        if not tracing():  # eager: a batch whose images all take one branch computes only that branch
            pooling = int(pool.sum())  # one host sync
            if pooling == pool.numel():
                return bipartite_merge(state, signals.head_keys, r)
            if pooling == 0:  # sizes materialised, as the selection gives them
                pruned = state.prefix_and_patches(keep_topk(scores, n - p - r))
                return dataclasses.replace(pruned, size=pruned.sizes())
        pooled = bipartite_merge(state, signals.head_keys, r)
        pruned = state.prefix_and_patches(keep_topk(scores, n - p - r))
        return select_state(pool, pooled, pruned)

    TUNED_FOR = ("deit_small_patch16_224", 196)
    """(architecture, patch tokens) the official threshold 7e-5 was tuned for."""

    def needs_calibration(self, params: dict[str, Any]) -> bool:
        """The default threshold is DeiT-S at 224's: anywhere else it is calibrated (half the images pooled)."""
        return "threshold" not in params and (self.info.architecture, self.info.num_patches) != self.TUNED_FOR

    def calibrate(self, model: nn.Module, images: Tensor, budget: float | None, params: dict[str, Any]) -> Any:
        """PPT's threshold chosen by :func:`tokenreduce.calibrate` on ``images`` (half pooled), applied."""
        from ..calibrate import calibrate

        return calibrate(model, "ppt", images, pool_fraction=0.5, budget=budget, **params)

    def schedule(self, num_tokens: int) -> Schedule:
        return in_block_schedule(
            num_tokens, self.info.depth, lambda block, n: n - self.removed(n) if block in self.layers else n
        )

    @classmethod
    def knob_values(cls, info: ModelInfo, base: PPTParams) -> range:
        return merge_count_values(info)


def _layer_thresholds(layers: tuple[int, ...], threshold: Threshold) -> dict[int, float]:
    """Map every reduction block to its threshold; validates ``threshold``."""
    values = tuple(threshold) if isinstance(threshold, (tuple, list)) else (threshold,) * len(layers)
    if len(values) != len(layers):
        raise ValueError(
            f"ppt: threshold needs one float or one per layer ({len(layers)}), got {len(values)} values"
        )
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"ppt: threshold values must be numbers >= 0, got {threshold!r}")
    return {int(block): float(value) for block, value in zip(layers, values, strict=True)}
