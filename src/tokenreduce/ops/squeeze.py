"""The squeeze operator of TPS (Wei et al., CVPR 2023), inference form.

After a pruning decision, every pruned token is folded into one kept token
instead of being discarded:

1. each pruned token ``p`` picks its *host* ``h(p) = argmax_r cos(x_p, x_r)``
   among the kept tokens ``r`` (cosine of the hidden states, each L2-normalised
   with eps 1e-6, divided by the temperature ``T``);
2. every host becomes the weighted mean of itself and the pruned tokens that
   chose it::

       x_r ← (e·x_r + Σ_{p: h(p)=r} e^{cos(p,r)/T}·x_p) / (e + Σ_{p: h(p)=r} e^{cos(p,r)/T})

   The host's own weight is the constant ``e¹`` (its self-cosine is 1) for every
   temperature, as in the official code; it is *not* ``e^{1/T}``.  Kept tokens
   that no pruned token chose are unchanged.

Ties are broken by ``argmax`` indices, so every pruned token has exactly one
host (the official code compares against the row maximum with ``==`` and
sends a tied token to several hosts).  Sizes and sources are bookkeeping the
paper does not have: a host's size becomes its own size plus its guests'
sizes, and its source row the union of theirs.  Everything is vectorised with
``scatter_add``; no Python loop over images.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .cpu_kernels import fused_squeeze
from .gather import batched_gather, batched_scatter_add
from .similarity import unit_rows

if TYPE_CHECKING:
    from ..state import TokenState

SELF_WEIGHT = math.e
"""Weight of a host token in its own squeeze (``e¹``, independent of the temperature)."""

def _unit(x: Tensor) -> Tensor:
    """Rows of ``x`` (…×C) divided by their L2 norm (:func:`~tokenreduce.ops.similarity.unit_rows`), in float32."""
    return unit_rows(x.float())


def squeeze_hosts(pruned: Tensor, kept: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Host of every pruned token and its squeeze weight.

    Args:
        pruned: B×M×C hidden states of the pruned tokens.
        kept: B×K×C hidden states of the kept (host candidate) tokens, K ≥ 1.
        temperature: T > 0; the similarity is ``cos / T``.

    Returns:
        ``(host, weight)``: B×M int64 positions into the K axis (exactly one host
        per pruned token; the lowest position among ties) and B×M float32
        weights ``exp(cos(p, h(p)) / T)``.
    """
    sim = _unit(pruned) @ _unit(kept).transpose(-1, -2) / temperature  # B×M×K
    host = sim.argmax(dim=-1)
    weight = sim.gather(-1, host.unsqueeze(-1)).squeeze(-1).exp()
    return host, weight


def squeeze_mean(kept: Tensor, pruned: Tensor, host: Tensor, weight: Tensor) -> Tensor:
    """Replace every host by the weighted mean of itself (weight e) and its guests.

    Args:
        kept: B×K×C host candidates; pruned: B×M×C guests.
        host: B×M host positions; weight: B×M guest weights.

    Returns:
        B×K×C, in ``kept.dtype`` (arithmetic in float32).
    """
    w = weight.float().unsqueeze(-1)  # B×M×1
    k = kept.shape[1]
    num = SELF_WEIGHT * kept.float() + batched_scatter_add(w * pruned.float(), host, k)
    den = SELF_WEIGHT + batched_scatter_add(w, host, k)
    return (num / den).to(kept.dtype)


def squeeze_state(
    state: TokenState, keep_index: Tensor, drop_index: Tensor, temperature: float = 1.0
) -> TokenState:
    """Keep the patch tokens ``keep_index`` and squeeze the ones at ``drop_index`` into them.

    Args:
        state: B×N tokens with ``P = state.num_prefix`` protected leading tokens.
        keep_index: B×K patch positions (counted from the first non-prefix token) kept, K ≥ 1.
        drop_index: B×M patch positions squeezed away (disjoint from ``keep_index``).
        temperature: T of :func:`squeeze_hosts`.

    Returns:
        A state with B×(P+K) tokens: the prefix tokens unchanged, then the kept
        tokens in ``keep_index`` order, each merged with its guests.  With restoration
        tracked, a guest's original tokens follow it to its host.
    """
    p = state.num_prefix
    if (state.owner is None and not state.archives and state.source is None and state.mask is None
            and state.pos is None):  # the fused CPU kernel, where eligible: the same rule in one call
        fused = fused_squeeze(state.x, state.size, keep_index, drop_index, p, temperature)
        if fused is not None:
            return replace(state, x=fused[0], size=fused[1])
    patches = state.x[:, p:]
    dropped = batched_gather(patches, drop_index)
    if state.owner is None and not state.archives:
        kept = state.prefix_and_patches(keep_index)
        host, weight = squeeze_hosts(dropped, kept.x[:, p:], temperature)
    else:  # the hosts first: the guests' original tokens follow them there
        host, weight = squeeze_hosts(dropped, batched_gather(patches, keep_index), temperature)
        kept = state.prefix_and_patches(keep_index, drop_index, p + host)
    k = keep_index.shape[1]
    x = squeeze_mean(kept.x[:, p:], dropped, host, weight)
    x = torch.cat([kept.x[:, :p], x], dim=1)
    size = kept.sizes()
    guest_size = batched_scatter_add(batched_gather(state.sizes()[:, p:], drop_index), host, k)
    size = torch.cat([size[:, :p], size[:, p:] + guest_size], dim=1)
    source = kept.source
    if source is not None:
        guest_source = batched_scatter_add(batched_gather(state.source[:, p:], drop_index), host, k)
        source = torch.cat([source[:, :p], (source[:, p:] + guest_source).clamp(max=1)], dim=1)
    return replace(kept, x=x, size=size, source=source)


def squeeze_masked(
    x: Tensor, keep: Tensor, guests: Tensor, temperature: float = 1.0, return_hosts: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """Training form of the squeeze at fixed shape (dTPS, docs/methods.md#tps-etps-and-dtps).

    Every guest (a token pruned at this stage) picks the most similar token among
    those still kept (never itself); each kept token becomes the weighted mean of
    itself (weight e) and its guests (weight ``guest·e^{guest·cos/T}``, which is
    ``e^{cos/T}`` for a guest, written as TPS writes it so that the gradient into the
    decision is TPS's).  Gradients flow through the similarities and through the
    straight-through masks.

    Args:
        x: B×M×C patch tokens.
        keep: B×M×1 mask of the tokens kept after this stage (0/1, may carry gradients).
        guests: B×M×1 mask of the tokens pruned at this stage.
        temperature: T.
        return_hosts: also return every token's host.

    Returns:
        B×M×C: kept tokens squeezed, the others unchanged; with ``return_hosts``, also B×M int64:
        the host of every token (meaningful for the guests).
    """
    m = x.shape[1]
    unit = unit_rows(x)
    sim = unit @ unit.transpose(-1, -2) / temperature  # B×M×M
    blocked = (keep.transpose(1, 2) <= 0) | torch.eye(m, dtype=torch.bool, device=x.device)
    sim = sim.masked_fill(blocked, -100.0)
    host = sim.detach().argmax(dim=-1)  # B×M
    # TPS's form exp(guest·cos/T)·guest: the same values as exp(cos/T)·guest, but the
    # straight-through decision also enters the exponent, and so the gradient.
    weight = (guests * sim.gather(-1, host.unsqueeze(-1))).exp() * guests  # B×M×1
    num = SELF_WEIGHT * x + batched_scatter_add(weight * x, host, m)
    den = SELF_WEIGHT + batched_scatter_add(weight, host, m)
    return (num / den, host) if return_hosts else num / den
