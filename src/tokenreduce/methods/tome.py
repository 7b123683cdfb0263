"""ToMe — Token Merging (Bolya et al., ICLR 2023).

In every block, after the attention residual and before the MLP, bipartite soft
matching on the head-averaged keys merges ``r`` tokens into their most similar
partners as a size-weighted average; proportional attention (``log size`` bias
on the keys) is on by default.  See docs/methods.md#tome.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..budget import Schedule, in_block_schedule
from ..ops.attention import AttentionNeeds, AttentionSignals
from ..ops.matching import max_merges
from ..ops.merge import bipartite_merge
from ..state import TokenState
from .base import EvaluationRow, ModelInfo, Params, Reducer, boolean, checked, merge_count_values, number_in

RSpec = int | tuple[int, float] | list[int]


@dataclass(frozen=True)
class ToMeParams(Params):
    """Parameters of :class:`ToMe`.

    Attributes:
        r: tokens merged per block: an int (every block), ``(r, inflection)`` with
            inflection in [-1, 1] (a linear schedule from ``int(r·(1−inflection))``
            to ``2r −`` that; −1 is the "decreasing" schedule), or a per-block list
            (shorter lists are padded with zeros).  Official DeiT-S/T setting: 13.
        prop_attn: proportional attention (``log size`` added to the key logits).
            True for off-the-shelf supervised models (ToMe's recommendation).
        inflection: the schedule's inflection for an int ``r``, as in ``(r, inflection)``: ``r=12,
            inflection=-1`` is ``r=(12, -1.0)``.  Separate so that a ``budget`` (which sets the int
            ``r``) can keep a schedule shape: ``budget=0.6, inflection=-1`` is the decreasing schedule
            that fits 0.6 of the GMACs.  0: the constant schedule.
    """

    r: RSpec = 13  # its form and length are checked against the depth by parse_r
    prop_attn: bool = checked(True, boolean)
    inflection: float = checked(0.0, number_in(-1.0, 1.0))


def parse_r(r: RSpec, depth: int, inflection: float = 0.0) -> list[int]:
    """Expand ToMe's ``r`` specification into one merge count per block (``inflection`` shapes an int ``r``)."""
    if isinstance(r, bool):
        raise ValueError(f"tome: r must be an int, (r, inflection) or a list of ints, got {r!r}")
    if inflection != 0.0 and not isinstance(r, int):
        raise ValueError(f"tome: inflection={inflection:g} shapes an int r; r={r!r} already sets the schedule "
                         f"(give the inflection in one place)")
    if isinstance(r, tuple) and len(r) == 2:
        r, inflection = r
        if not isinstance(r, int) or not isinstance(inflection, (int, float)) or not -1 <= inflection <= 1:
            raise ValueError(f"tome: (r, inflection) needs an int r and inflection in [-1, 1], got {(r, inflection)!r}")
    elif isinstance(r, (list, tuple)):
        values = list(r)
        if len(values) > depth or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ValueError(f"tome: a per-block r list needs at most {depth} ints, got {values!r}")
        if any(v < 0 for v in values):
            raise ValueError(f"tome: r values must be >= 0, got {values!r}")
        return values + [0] * (depth - len(values))
    elif not isinstance(r, int):
        raise ValueError(f"tome: r must be an int, (r, inflection) or a list of ints, got {r!r}")
    if r < 0:
        raise ValueError(f"tome: r must be >= 0, got {r}")
    start = int(r * (1.0 - inflection))
    end = 2 * r - start
    if depth == 1:
        return [start]
    step = (end - start) / (depth - 1)
    return [int(start + step * i) for i in range(depth)]


class ToMe(Reducer):
    """Bipartite soft matching in every block."""

    name = "tome"
    recipe = "tome"
    Params = ToMeParams
    knob = "r"

    def __init__(self, info: ModelInfo, params: ToMeParams) -> None:
        super().__init__(info, params)
        self.r_per_block = parse_r(params.r, info.depth, params.inflection)
        self.prop_attn = bool(params.prop_attn)

    def needs(self, block: int) -> AttentionNeeds | None:
        # the keys per head: the merge averages them (on the CPU inside its fused kernel)
        return AttentionNeeds(head_keys=True) if self.r_per_block[block] > 0 else None

    def reduce(self, block: int, state: TokenState, signals: AttentionSignals) -> TokenState:
        return bipartite_merge(state, signals.head_keys, self.r_per_block[block])

    def schedule(self, num_tokens: int) -> Schedule:
        p, r_per_block = self.info.num_prefix, self.r_per_block
        return in_block_schedule(
            num_tokens, len(r_per_block), lambda block, n: n - min(r_per_block[block], max_merges(n, p))
        )

    @classmethod
    def evaluation_rows(cls, info: ModelInfo, budgets: Sequence[float], task: str = "classification",
                        ) -> list[EvaluationRow]:
        """The usual rows; for segmentation also the decreasing schedule at every budget: under a dense head a
        patch merged early has more blocks left to refine its group's feature, and it scores higher there
        (docs/segmentation.md#results)."""
        rows = super().evaluation_rows(info, budgets, task)
        if task == "segmentation":
            rows += [(f"{cls.name}@{b:g} decreasing", {"inflection": -1.0}, b) for b in budgets]
        return rows

    @classmethod
    def knob_values(cls, info: ModelInfo, base: ToMeParams) -> range:
        return merge_count_values(info)
