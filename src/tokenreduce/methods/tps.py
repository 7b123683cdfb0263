"""TPS — joint Token Pruning & Squeezing (Wei et al., CVPR 2023), the eTPS variant.

eTPS is EViT's selection followed by TPS's squeeze (docs/methods.md#tps-etps-and-dtps): inside
blocks ``layers`` (default 3, 6, 9), after the attention residual, the
``ceil(keep_rate·(N−P))`` patch tokens with the highest head-averaged
class-token attention are kept (in descending score order) and every other
patch token is squeezed into its most similar kept token
(:mod:`tokenreduce.ops.squeeze`).  The output has ``P + ceil(keep_rate·(N−P))``
tokens — EViT's counts without the fused token.

The paper has no proportional attention; ``prop_attn=True`` adds the
``log size`` key bias using the sizes the squeeze accumulates (opt-in).

dTPS, the learned variant, is its own method, ``dtps``
(:mod:`tokenreduce.methods.dtps`); ``tps`` with ``variant="dtps"`` is an alias for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..ops.attention import AttentionSignals
from ..ops.prune import keep_topk
from ..ops.squeeze import squeeze_state
from ..state import TokenState
from .base import ModelInfo, Params, Reducer, block_indices, boolean, checked, fraction, one_of, positive
from .dtps import DTPS
from .evit import KeepRateReducer

VARIANTS = ("etps", "dtps")


@dataclass(frozen=True)
class TPSParams(Params):
    """Parameters of :class:`TPS`.

    Attributes:
        variant: ``"etps"`` (training-free, EViT selection inside blocks); ``"dtps"`` is an
            alias for the method ``dtps`` (:class:`~tokenreduce.methods.dtps.DTPS`).
        keep_rate: fraction of the current patch tokens kept at each reduction block (ρ).
        layers: 0-based reduction blocks (the paper's ``prune_loc``).
        temperature: T of the squeeze similarity ``cos / T`` (host self-weight stays e¹).
        prop_attn: proportional attention with the squeezed sizes (not in the paper).
    """

    variant: str = checked("etps", one_of(*VARIANTS))
    keep_rate: float = checked(0.7, fraction)
    layers: tuple[int, ...] = checked((3, 6, 9), block_indices)
    temperature: float = checked(1.0, positive)
    prop_attn: bool = checked(False, boolean)


class TPS(KeepRateReducer):
    """eTPS: keep the top class-attention tokens, squeeze the rest into them."""

    name = "tps"
    recipe = "tps"
    Params = TPSParams

    @classmethod
    def resolve(cls, params: dict[str, Any]) -> tuple[type[Reducer], dict[str, Any]]:
        """``variant="dtps"`` is an alias for the method ``dtps`` (:class:`~tokenreduce.methods.dtps.DTPS`)."""
        variant = params.get("variant", "etps")
        if isinstance(variant, str) and variant.lower() == "dtps":
            return DTPS, {k: v for k, v in params.items() if k != "variant"}
        return cls, params

    def __init__(self, info: ModelInfo, params: TPSParams) -> None:
        if params.variant != "etps":  # "dtps" is resolved to its own class before construction
            raise ValueError(f"tps: variant={params.variant!r} is the method dtps; create it with tokenreduce.apply")
        self.temperature = params.temperature
        super().__init__(info, params)
        self.prop_attn = params.prop_attn

    def reduce(self, block: int, state: TokenState, signals: AttentionSignals) -> TokenState:
        keep = self.kept_patches(state)
        if keep is None:
            return state
        cls_attn = self.class_attention(state, signals)
        order = keep_topk(cls_attn, cls_attn.shape[1])  # all patch tokens, descending score
        return squeeze_state(state, order[:, :keep], order[:, keep:], self.temperature)
