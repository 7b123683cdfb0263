"""The tokens flowing through a reduced model.

A :class:`TokenState` bundles the hidden states with the per-token bookkeeping
that every method shares:

* ``size``   B×N×1 float: how many original patches each token stands for
  (``None`` means "all ones", the state before any merge);
* ``source`` B×N×N0 0/1 map from current tokens to original tokens
  (``None`` unless source tracing was asked for);
* ``num_prefix``: the leading class / distillation / register tokens, which no
  method may prune or merge;
* ``mask`` B×N×1 float: 1 for a live token, 0 for a removed one (``None`` = all
  live).  Training forms of learned methods (LTMP, DynamicViT) keep the shape fixed
  and carry a differentiable mask; batched inference with per-image token counts
  pads with mask 0.  Masked tokens are excluded from attention as keys.
* ``pos`` B×N×1 int64: the original sequence position (prefix included) of the
  token, for families whose attention depends on it (rotary position embeddings);
  ``None`` when the family does not track positions.  Every reduction carries it
  along: a kept token keeps its own, a merge destination (ToMe, PPT pooling, LTMP)
  and a squeeze host (TPS) keep theirs, appended tokens that are new combinations
  with no single position (EViT's fused token, BAT's cluster tokens) get ``-1``
  ("no position": no rotation, like the prefix tokens), and tokens that rejoin
  (Cropr's last-layer fusion) bring their own back.

Reductions never mutate a state; they return a new one.  The two generic
operations are :meth:`TokenState.gather` (keep a subset, in a given order) and
the merges in :mod:`tokenreduce.ops.merge`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .ops.gather import batched_gather

NO_POSITION = -1
"""``pos`` of a token with no single original position (a new combination of tokens)."""


@dataclass(frozen=True)
class TokenState:
    """Hidden states plus sizes and (optionally) sources.

    Attributes:
        x: B×N×C hidden states.
        size: B×N×1 float sizes, or ``None`` for all ones.
        source: B×N×N0 source map, or ``None`` when not traced.
        num_prefix: number of protected leading tokens.
        mask: B×N×1 float live-token mask, or ``None`` when every token is live.
        pos: B×N×1 int64 original positions (``NO_POSITION`` for none), or ``None`` when not tracked.
    """

    x: Tensor
    size: Tensor | None = None
    source: Tensor | None = None
    num_prefix: int = 1
    mask: Tensor | None = None
    pos: Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.x.shape[1]

    def sizes(self) -> Tensor:
        """B×N×1 float32 sizes, materialising ones if no merge happened yet."""
        if self.size is not None:
            return self.size
        return self.x.new_ones(self.x.shape[0], self.x.shape[1], 1, dtype=torch.float32)

    def with_x(self, x: Tensor) -> TokenState:
        return replace(self, x=x)

    def gather(self, index: Tensor) -> TokenState:
        """Keep tokens ``index`` (B×K, positions in the current sequence), in that order."""
        return TokenState(
            x=batched_gather(self.x, index),
            size=None if self.size is None else batched_gather(self.size, index),
            source=None if self.source is None else batched_gather(self.source, index),
            num_prefix=self.num_prefix,
            mask=None if self.mask is None else batched_gather(self.mask, index),
            pos=None if self.pos is None else batched_gather(self.pos, index),
        )

    def prefix_and_patches(self, keep_patch_index: Tensor) -> TokenState:
        """Keep all prefix tokens plus the patch tokens at ``keep_patch_index``.

        Args:
            keep_patch_index: B×K positions counted from the first non-prefix token.
        """
        p = self.num_prefix
        b = keep_patch_index.shape[0]
        prefix = torch.arange(p, device=keep_patch_index.device).expand(b, p)
        return self.gather(torch.cat([prefix, keep_patch_index + p], dim=1))

    def append(self, x: Tensor, size: Tensor, source: Tensor | None, pos: Tensor | None = None) -> TokenState:
        """Concatenate extra tokens (B×M×C, sizes B×M×1, sources B×M×N0) at the end.

        ``pos`` (B×M×1) gives their original positions when they have one (tokens rejoining);
        by default they are new combinations with none (:data:`NO_POSITION`).
        """
        new_size = torch.cat([self.sizes(), size], dim=1)
        new_source = None
        if self.source is not None:
            if source is None:  # a reducer bug, not a user error: never continue with a wrong token map
                raise RuntimeError("source tracing is on: tokens appended to the state need their sources")
            new_source = torch.cat([self.source, source], dim=1)
        new_mask = None
        if self.mask is not None:
            new_mask = torch.cat([self.mask, self.mask.new_ones(x.shape[0], x.shape[1], 1)], dim=1)
        new_pos = None
        if self.pos is not None:
            if pos is None:
                pos = self.pos.new_full((x.shape[0], x.shape[1], 1), NO_POSITION)
            new_pos = torch.cat([self.pos, pos], dim=1)
        return TokenState(torch.cat([self.x, x], dim=1), new_size, new_source, self.num_prefix, new_mask, new_pos)
