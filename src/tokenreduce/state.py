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

* ``packing``: the *packed stream* of padded batched inference (``None`` otherwise): ``x`` holds only the
  live tokens, ΣN×C, image by image, and every image's live tokens are its first positions of the B×N
  layout that ``mask``, ``size`` and ``pos`` keep (:class:`Packing`).  Only a reducer that declares
  ``packs_stream`` (LTMP) ever receives such a state; :meth:`TokenState.unpacked` gives the padded one.

Reductions never mutate a state; they return a new one.  The two generic
operations are :meth:`TokenState.gather` (keep a subset, in a given order) and
the merges in :mod:`tokenreduce.ops.merge`.

**Restoration bookkeeping** (``owner`` and ``archive``, only when restoration or last-layer fusion
is asked for; ``None`` / empty otherwise, at no cost):

* ``owner`` B×N0 int64: for every original token j (prefix included), where its feature is now:
  ``owner[b, j] = t >= 0`` is the current token t that stands for it (itself, or the token it was
  merged, pooled, squeezed or clustered into), ``owner[b, j] = −1 − a < 0`` is row a of the
  archive (it was pruned).  Every reduction updates it through :func:`follow` with a B×N map from
  the old tokens to the new ones (cheap: B×N0 integers, never the B×N×N0 ``source`` matrix).
* ``archive``: the pruned tokens, frozen at the feature they had when pruned, as a tuple of
  prefix-free token states (one chunk per pruning step, rows numbered across the chunks in
  order).  A chunk's ``mask`` (B×M×1) is 0 on rows that stand for no original token (padding of
  per-image counts, tokens that were already orphans), ``None`` when every row stands for one.
* ``orphans``: some current token may stand for no original token (EViT's fused token, whose
  patches keep their own frozen features): archived rows then get a mask computed from
  ``owner`` instead of the static "every row is owned".
* ``archives``: pruned tokens are archived although no owner map is tracked (last-layer fusion
  without restoration, Cropr's ``llf`` at its default): they rejoin, but nothing maps the original
  grid onto them, which saves the owner map's upkeep at every reduction.  Only plain pruning (no
  live mask) is supported this way; a masked reduction raises.

:meth:`TokenState.restore` puts the original grid back (B×N0×C, original order) and
:meth:`TokenState.rejoin` brings the archived tokens back into the sequence (last-layer fusion).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .ops.gather import batched_gather, padded_rows

NO_POSITION = -1
"""``pos`` of a token with no single original position (a new combination of tokens)."""


@dataclass(frozen=True)
class Packing:
    """Where the rows of a packed ``TokenState.x`` (ΣN×C) sit in its B×N layout.

    Attributes:
        rows: ΣN int64 rows of the live tokens in the B·N flattening, increasing.
        counts: B int64 live tokens per image: image ``b``'s are its first ``counts[b]`` positions.
    """

    rows: Tensor
    counts: Tensor


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
        owner: B×N0 int64 index map from the original tokens to the current tokens (``>= 0``) or to
            archive rows (``< 0``: row ``−1 − owner``), or ``None`` when restoration is not tracked.
        archive: the pruned tokens (prefix-free states, frozen when pruned), in archive-row order.
        orphans: whether a current token may stand for no original token (module docstring).
        archives: archive pruned tokens without an owner map (module docstring).
        packing: ``x`` holds only the live tokens (ΣN×C) at these rows (module docstring), or ``None``.
        size_bias: ``(size, log size)`` where the reduction that made ``size`` computed its proportional-attention
            bias as well (B×1×1×N, :func:`~tokenreduce.ops.attention.size_bias`; LTMP's fused step), or ``None``.
            It holds only while ``size`` is that very tensor: the reduced model checks, so a state whose size was
            replaced since has its bias computed again.
    """

    x: Tensor
    size: Tensor | None = None
    source: Tensor | None = None
    num_prefix: int = 1
    mask: Tensor | None = None
    pos: Tensor | None = None
    owner: Tensor | None = None
    archive: tuple[TokenState, ...] = ()
    orphans: bool = False
    archives: bool = False
    packing: Packing | None = None
    size_bias: tuple[Tensor, Tensor] | None = None

    @property
    def num_tokens(self) -> int:
        return self.x.shape[1] if self.packing is None else self.mask.shape[1]

    @property
    def num_archived(self) -> int:
        """Rows in the archive (all chunks)."""
        return sum(chunk.num_tokens for chunk in self.archive)

    def sizes(self) -> Tensor:
        """B×N×1 float32 sizes, materialising ones if no merge happened yet."""
        if self.size is not None:
            return self.size
        batch = self.x.shape[0] if self.packing is None else self.mask.shape[0]
        return self.x.new_ones(batch, self.num_tokens, 1, dtype=torch.float32)

    def packed(self) -> TokenState:
        """The packed form of a padded batch (``x`` ΣN×C, :class:`Packing`); the state itself when packed
        already or when every token is live.  The live tokens must be every image's first positions (the
        compaction of LTMP's inference form); ``mask`` must be hard (0 or 1)."""
        if self.packing is not None or self.mask is None:
            return self
        live = self.mask.reshape(-1)
        rows = live.nonzero().squeeze(1)
        counts = self.mask.sum(dim=(1, 2)).long()
        return replace(self, x=self.x.reshape(-1, self.x.shape[-1]).index_select(0, rows),
                       packing=Packing(rows, counts))

    def unpacked(self) -> TokenState:
        """The padded form (``x`` B×N×C, padding rows zero) of a packed state; the state itself otherwise."""
        if self.packing is None:
            return self
        batch, n = self.mask.shape[:2]
        return replace(self, x=padded_rows(self.x, self.packing.rows, batch, n), packing=None)

    def with_x(self, x: Tensor) -> TokenState:
        return replace(self, x=x)

    def stepped(self, x: Tensor, size: Tensor | None, mask: Tensor | None, pos: Tensor | None,
                packing: Packing | None, log_size: Tensor | None = None) -> TokenState:
        """``dataclasses.replace(self, x=x, size=size, mask=mask, pos=pos, packing=packing, size_bias=…)`` without
        its walk over the fields, which costs as much as a small op at batch 1 (LTMP's fused step; the sources and
        the owner map are kept as they are, so the caller is one that tracks neither).  ``log_size``: ``size``'s
        bias where the step computed it (``size_bias``)."""
        return TokenState(x, size, self.source, self.num_prefix, mask, pos, self.owner, self.archive, self.orphans,
                          self.archives, packing, None if log_size is None else (size, log_size))

    def _rows(self, index: Tensor, num_prefix: int) -> TokenState:
        """The tokens ``index`` (B×K) with their per-token tensors, no restoration bookkeeping."""
        return TokenState(
            x=batched_gather(self.x, index),
            size=None if self.size is None else batched_gather(self.size, index),
            source=None if self.source is None else batched_gather(self.source, index),
            num_prefix=num_prefix,
            mask=None if self.mask is None else batched_gather(self.mask, index),
            pos=None if self.pos is None else batched_gather(self.pos, index),
        )

    def gather(self, index: Tensor, dropped: Tensor | None = None, into: Tensor | None = None) -> TokenState:
        """Keep tokens ``index`` (B×K, positions in the current sequence, no repeats), in that order.

        With restoration tracked (``owner`` set) the other tokens are **pruned**: archived with their
        current features, unless ``into`` says where each of them went.

        Args:
            index: B×K positions kept.
            dropped: B×M positions of the tokens not kept, if the caller has them (saves computing
                the complement); needed with ``into``.
            into: B×M positions *in the output* of the token each ``dropped`` token was merged into
                (a squeeze host, a cluster token); a position ``>= K`` names a token appended right
                after (position K is the first appended one).  ``None``: the dropped tokens are pruned.

        A carried ``mask`` counts too: a kept token whose mask is 0 is dead (padding), and if it
        still stood for original tokens it is archived as pruned (LTMP's compaction).
        """
        out = replace(self._rows(index, self.num_prefix), archive=self.archive, orphans=self.orphans,
                      archives=self.archives)
        if self.owner is None:
            if not self.archives or into is not None or index.shape[1] == self.num_tokens:
                return out
            return replace(out, archive=(*self.archive, self._pruned_rows(index, dropped)))
        owner, archive = self._follow_selection(index, dropped, into)
        return replace(out, owner=owner, archive=archive)

    def prefix_and_patches(
        self, keep_patch_index: Tensor, dropped: Tensor | None = None, into: Tensor | None = None
    ) -> TokenState:
        """Keep all prefix tokens plus the patch tokens at ``keep_patch_index``.

        Args:
            keep_patch_index: B×K positions counted from the first non-prefix token.
            dropped: B×M patch positions (also counted after the prefix) not kept, optional; see :meth:`gather`.
            into: B×M output positions the ``dropped`` tokens were merged into; see :meth:`gather`.
        """
        p = self.num_prefix
        b = keep_patch_index.shape[0]
        prefix = torch.arange(p, device=keep_patch_index.device).expand(b, p)
        return self.gather(torch.cat([prefix, keep_patch_index + p], dim=1), None if dropped is None else dropped + p,
                           into)

    def append(
        self, x: Tensor, size: Tensor, source: Tensor | None, pos: Tensor | None = None, mask: Tensor | None = None,
        orphan: bool = False,
    ) -> TokenState:
        """Concatenate extra tokens (B×M×C, sizes B×M×1, sources B×M×N0) at the end.

        ``pos`` (B×M×1) gives their original positions when they have one (tokens rejoining);
        by default they are new combinations with none (:data:`NO_POSITION`).  ``mask`` (B×M×1):
        their live mask (default all live).  ``orphan``: with restoration tracked, the new tokens
        may stand for no original token (no owner points at them).
        """
        new_size = torch.cat([self.sizes(), size], dim=1)
        new_source = None
        if self.source is not None:
            if source is None:  # a reducer bug, not a user error: never continue with a wrong token map
                raise RuntimeError("source tracing is on: tokens appended to the state need their sources")
            new_source = torch.cat([self.source, source], dim=1)
        new_mask = None
        if self.mask is not None or mask is not None:
            old = self.mask if self.mask is not None else self.x.new_ones(x.shape[0], self.num_tokens, 1)
            extra = mask if mask is not None else old.new_ones(x.shape[0], x.shape[1], 1)
            new_mask = torch.cat([old, extra.to(old.dtype)], dim=1)
        new_pos = None
        if self.pos is not None:
            if pos is None:
                pos = self.pos.new_full((x.shape[0], x.shape[1], 1), NO_POSITION)
            new_pos = torch.cat([self.pos, pos], dim=1)
        return replace(self, x=torch.cat([self.x, x], dim=1), size=new_size, source=new_source, mask=new_mask,
                       pos=new_pos, orphans=self.orphans or (orphan and self.owner is not None))

    # -- restoration bookkeeping ---------------------------------------------------------------------
    def redirect(self, target: Tensor) -> TokenState:
        """Tokens merged into others in place (the sequence keeps its length): token ``t`` now stands
        where ``target[:, t]`` is (B×N positions in this sequence; ``t`` itself when not merged).

        Used before a masked compaction (LTMP) or a fixed-shape squeeze (dTPS training): the merged
        token's original tokens follow it to its destination.  A no-op without restoration tracking.
        """
        if self.owner is None:
            return self
        n = self.num_tokens
        return replace(self, owner=follow(self.owner, target, n, n))

    def masked(self, mask: Tensor) -> TokenState:
        """The same tokens with live mask ``mask`` (B×N×1): a token that stood for original tokens and is
        now dead (mask 0) is pruned in place, archived with its current feature (DynamicViT's training form)."""
        out = replace(self, mask=mask)
        if self.owner is None:
            if self.archives:
                raise RuntimeError("TokenState.masked: archiving pruned tokens without an owner map supports "
                                   "plain pruning only (track restoration for masked reductions)")
            return out
        owner, archive = out._follow_selection(None, None, None)
        return replace(out, owner=owner, archive=archive)

    def _pruned_rows(self, index: Tensor, dropped: Tensor | None) -> TokenState:
        """The archive chunk of a plain pruning without an owner map: the tokens outside ``index`` (B×K),
        in ``dropped`` order when given (B×(N−K)), else in position order."""
        if self.mask is not None:
            raise RuntimeError("TokenState.gather: archiving pruned tokens without an owner map supports plain "
                               "pruning only (no live mask); track restoration for masked reductions")
        return self._rows(self._outside(index) if dropped is None else dropped, 0)

    def _outside(self, index: Tensor) -> Tensor:
        """B×(N−K) positions not in ``index`` (B×K, no repeats), in position order."""
        b, n, k = self.x.shape[0], self.num_tokens, index.shape[1]
        outside = torch.ones(b, n, dtype=torch.int8, device=index.device).scatter(1, index, 0)
        return outside.argsort(dim=1, descending=True, stable=True)[:, : n - k]

    def _follow_selection(
        self, index: Tensor | None, dropped: Tensor | None, into: Tensor | None
    ) -> tuple[Tensor, tuple[TokenState, ...]]:
        """``(owner, archive)`` after keeping ``index`` (``None``: every token, in place) of this state."""
        owner = self.owner
        b, n = self.x.shape[0], self.num_tokens
        device = owner.device
        if index is None:
            k = n
            remap = torch.arange(n, device=device).expand(b, n)
        else:
            k = index.shape[1]
            remap = torch.zeros(b, n, dtype=torch.long, device=device).scatter(
                1, index, torch.arange(k, device=device).expand(b, k))
        archive = self.archive
        first_row = self.num_archived
        if into is not None:  # merged elsewhere: nothing archived among them
            if dropped is None:
                raise ValueError("TokenState.gather: `into` needs the `dropped` positions it describes")
            remap = remap.scatter(1, dropped, into.to(torch.long))
            if self.mask is None:
                return follow(owner, remap, n, k), archive
        if self.mask is None:  # plain pruning: every token outside ``index`` (N − K per image) is archived
            if index is None or k == n:
                return follow(owner, remap, n, k), archive
            if dropped is None:
                dropped = self._outside(index)
            chunk = self._rows(dropped, 0)
            if self.orphans:  # a row standing for no original token must not rejoin
                chunk = replace(chunk, mask=owned(owner, n).gather(1, dropped).unsqueeze(-1).to(self.x.dtype))
            rows = first_row + torch.arange(n - k, device=device)
            remap = remap.scatter(1, dropped, (-1 - rows).expand(b, n - k))
            return follow(owner, remap, n, k), (*archive, chunk)
        # a live mask: a token is kept if it is in ``index`` and live; a dead token that still stands for
        # original tokens is archived (per-image counts differ: the chunk is padded, its mask says which rows)
        kept = torch.zeros(b, n, dtype=torch.bool, device=device)
        if index is None:
            kept = kept.logical_not()
        else:
            kept = kept.scatter(1, index, True)
        kept &= self.mask[..., 0] > 0
        pruned = owned(owner, n) & ~kept
        if into is not None:
            pruned = pruned.scatter(1, dropped, False)
        counts = pruned.sum(dim=1)
        m = int(counts.max()) if b else 0  # host sync: the chunk's padded length
        if m == 0:
            return follow(owner, remap, n, k), archive
        rank = pruned.cumsum(dim=1) - 1
        remap = torch.where(pruned, -1 - first_row - rank, remap)
        positions = pruned.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :m]
        chunk = self._rows(positions, 0)
        live = (torch.arange(m, device=device) < counts.unsqueeze(1)).unsqueeze(-1).to(self.x.dtype)
        chunk = replace(chunk, mask=live)
        return follow(owner, remap, n, k), (*archive, chunk)

    def restore(self) -> Tensor:
        """B×N0×C: every original token's feature, in the original order (prefix first): its current
        token's, or its archived (frozen) one.

        Raises:
            RuntimeError: restoration is not tracked (``owner`` is ``None``).
        """
        if self.owner is None:
            raise RuntimeError("this token state does not track restoration (no owner map)")
        if not self.archive:
            return batched_gather(self.x, self.owner)
        n = self.num_tokens
        table = torch.cat([self.x, *(chunk.x for chunk in self.archive)], dim=1)
        return batched_gather(table, torch.where(self.owner >= 0, self.owner, n - 1 - self.owner))

    def rejoin(self) -> TokenState:
        """Last-layer fusion: the archived (pruned) tokens rejoin the sequence at its end, frozen as
        they were when pruned, with their own sizes, positions and sources; archive rows that stand for
        no original token come back dead (mask 0).  The archive is then empty."""
        if not self.archive:
            return self
        chunks = self.archive
        b = self.x.shape[0]
        masks = [c.mask for c in chunks]
        mask = None
        if any(m is not None for m in masks):
            mask = torch.cat([m if m is not None else c.x.new_ones(b, c.num_tokens, 1)
                              for c, m in zip(chunks, masks, strict=True)], dim=1)
        source = None if self.source is None else torch.cat([c.source for c in chunks], dim=1)
        pos = None if self.pos is None else torch.cat([c.pos for c in chunks], dim=1)
        out = self.append(torch.cat([c.x for c in chunks], dim=1), torch.cat([c.sizes() for c in chunks], dim=1),
                          source, pos, mask)
        if self.owner is None:  # archived without an owner map: nothing to renumber
            return replace(out, archive=())
        n = self.num_tokens
        owner = torch.where(self.owner >= 0, self.owner, n - 1 - self.owner)
        return replace(out, owner=owner, archive=())


def owned(owner: Tensor, num_tokens: int) -> Tensor:
    """B×N bool: which of the ``num_tokens`` current tokens stand for at least one original token."""
    b = owner.shape[0]
    target = torch.where((owner >= 0) & (owner < num_tokens), owner, num_tokens)
    out = torch.zeros(b, num_tokens + 1, dtype=torch.bool, device=owner.device)
    return out.scatter(1, target, True)[:, :num_tokens]


def follow(owner: Tensor, remap: Tensor, num_old: int, num_new: int) -> Tensor:
    """The owner map after a reduction.

    Args:
        owner: B×N0 owner map (module docstring).
        remap: B×``num_old`` int64: for every old token, the new token that now stands for it, or an
            archive row as ``−1 − row`` (pruned).  Rows of tokens nobody owns are ignored.
        num_old: N, tokens before the reduction; num_new: N', after it.

    Returns:
        B×N0 int64: archived entries unchanged; entries pointing at old tokens moved through ``remap``;
        entries ``>= num_old`` (tokens to be appended after the old sequence, see
        :meth:`TokenState.gather`'s ``into``) shifted by ``num_new − num_old``, so they still name
        the tokens appended next.
    """
    moved = remap.gather(1, owner.clamp(0, num_old - 1))
    out = torch.where(owner >= 0, moved, owner)
    return torch.where(owner >= num_old, owner + (num_new - num_old), out)


def select(choose_first: Tensor, first: TokenState, second: TokenState) -> TokenState:
    """Per image, ``first`` where ``choose_first`` (B bool) else ``second``; both B×N' with equal shapes,
    reduced from the same state (PPT's pool-or-prune choice).

    Sizes are materialised; every per-token tensor (sources when traced, masks, positions, owners) is
    selected the same way.  Archive chunks that only one branch added are kept, with their rows dead
    (mask 0) for the images that chose the other branch; the second branch's archive rows are
    renumbered after the first's.
    """
    pick = choose_first.view(-1, 1, 1)
    chosen = {}
    for name in ("x", "size", "source", "mask", "pos"):
        a, b = getattr(first, name), getattr(second, name)
        if name == "size":
            a, b = first.sizes(), second.sizes()
        if isinstance(a, Tensor) and isinstance(b, Tensor):
            chosen[name] = torch.where(pick, a, b)
        elif a is not None or b is not None:
            if name != "mask":
                raise ValueError(f"select: one branch carries {name} and the other does not")
            ones = (a if a is not None else b).new_ones(())
            chosen[name] = torch.where(pick, a if a is not None else ones, b if b is not None else ones)
    if first.owner is None:
        return replace(first, **chosen, orphans=first.orphans or second.orphans)
    shared = 0
    while (shared < min(len(first.archive), len(second.archive))
           and first.archive[shared] is second.archive[shared]):
        shared += 1
    common = first.archive[:shared]
    base = sum(c.num_tokens for c in common)
    extra_first = sum(c.num_tokens for c in first.archive[shared:])
    owner_second = torch.where(second.owner < -base, second.owner - extra_first, second.owner)
    chosen["owner"] = torch.where(choose_first.view(-1, 1), first.owner, owner_second)

    def only_for(chunk: TokenState, images: Tensor) -> TokenState:
        live = images.view(-1, 1, 1).to(chunk.x.dtype)
        return replace(chunk, mask=live.expand(-1, chunk.num_tokens, 1) if chunk.mask is None else chunk.mask * live)

    archive = (*common, *(only_for(c, choose_first) for c in first.archive[shared:]),
               *(only_for(c, ~choose_first) for c in second.archive[shared:]))
    return replace(first, **chosen, archive=archive, orphans=first.orphans or second.orphans)
