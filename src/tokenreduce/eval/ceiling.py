"""The speed a token schedule allows by itself, without any method's own work.

:class:`ScheduleOnly` reaches another reducer's token counts by slicing the
sequence (no scoring, no matching, no merging, no size bias).  Timed next to the
real method and the unreduced model, it separates two losses of efficiency:

* the method's own operations (scores, sorts, gathers, merges), which the
  implementation controls, and
* the token counts themselves: GEMMs with fewer rows run at lower FLOP rates on
  CPUs, and at batch 1 the weights are read once per forward whatever the
  number of tokens, so a schedule's *ceiling* efficiency is below 1 there.

Used by :func:`tokenreduce.eval.throughput.compare_throughput` (``ceiling=True``)
and ``benchmarks/speed.py``; not a method (its outputs are meaningless).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..budget import Schedule
from ..methods.base import ModelInfo, Reducer
from ..models import adapter_for, patch
from ..models.base import is_patched
from ..ops.attention import AttentionNeeds, AttentionSignals
from ..state import TokenState


@dataclass(frozen=True)
class ScheduleParams:
    """The followed schedule: ``(tokens into attention, tokens into the MLP)`` per block."""

    counts: tuple[tuple[int, int], ...]


class ScheduleOnly(Reducer):
    """Follow a schedule of ``(tokens into attention, tokens into the MLP)`` per block by slicing."""

    name = "schedule-only"

    def __init__(self, info: ModelInfo, schedule: Schedule) -> None:
        self.counts = tuple((int(a), int(m)) for a, m in schedule)
        super().__init__(info, ScheduleParams(self.counts))

    def has_before_block(self, block: int) -> bool:
        return block > 0 and self.counts[block][0] != self.counts[block - 1][1]

    def before_block(self, block: int, state: TokenState) -> TokenState:
        return _resize(state, self.counts[block][0])

    def needs(self, block: int) -> AttentionNeeds | None:
        attn, mlp = self.counts[block]
        return AttentionNeeds() if mlp != attn else None

    def reduce(self, block: int, state: TokenState, signals: AttentionSignals) -> TokenState:
        return _resize(state, self.counts[block][1])


def _resize(state: TokenState, n: int) -> TokenState:
    """The first ``n`` tokens, or the tokens repeated up to ``n`` (a schedule that grows, e.g. Cropr's LLF)."""
    x, pos = state.x, state.pos
    if n > x.shape[1]:
        x = x.repeat(1, -(-n // x.shape[1]), 1)
        pos = None if pos is None else pos.repeat(1, -(-n // pos.shape[1]), 1)
    return TokenState(x[:, :n], num_prefix=state.num_prefix, pos=None if pos is None else pos[:, :n])


def schedule_only_model(model: nn.Module, schedule: Schedule) -> nn.Module:
    """Patch ``model`` (unreduced, in place) to follow ``schedule`` by slicing; returns it.

    Raises:
        ValueError: ``model`` is already reduced (a copy of a reduced model is reduced too).
    """
    if is_patched(model):
        raise ValueError("schedule_only_model needs an unreduced model; call tokenreduce.remove(model) first "
                         "(a deep copy of a reduced model is reduced as well)")
    adapter = adapter_for(model)
    patch(model, adapter, ScheduleOnly(adapter.model_info(model), schedule), ScheduleOnly.name)
    return model
