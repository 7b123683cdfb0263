"""TPS — joint Token Pruning & Squeezing (Wei et al., CVPR 2023), the eTPS variant.

eTPS is EViT's selection followed by TPS's squeeze (specs/methods.md §5): inside
blocks ``layers`` (default 3, 6, 9), after the attention residual, the
``ceil(keep_rate·(N−P))`` patch tokens with the highest head-averaged
class-token attention are kept (in descending score order) and every other
patch token is squeezed into its most similar kept token
(:mod:`tokenreduce.ops.squeeze`).  The output has ``P + ceil(keep_rate·(N−P))``
tokens — EViT's counts without the fused token.

The paper has no proportional attention; ``prop_attn=True`` adds the
``log size`` key bias using the sizes the squeeze accumulates (opt-in).

``variant="dtps"`` (DynamicViT-style learned predictor before the blocks) needs a
trained predictor and is not available yet; asking for it raises ``ValueError``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..ops.attention import AttentionSignals
from ..ops.prune import keep_topk
from ..ops.squeeze import squeeze_state
from ..state import TokenState
from .base import ModelInfo
from .evit import KeepRateReducer, kept_count

VARIANTS = ("etps", "dtps")


@dataclass(frozen=True)
class TPSParams:
    """Parameters of :class:`TPS`.

    Attributes:
        variant: ``"etps"`` (training-free, EViT selection inside blocks).
            ``"dtps"`` is recognised but not available yet.
        keep_rate: fraction of the current patch tokens kept at each reduction block (ρ).
        layers: 0-based reduction blocks (the paper's ``prune_loc``).
        temperature: T of the squeeze similarity ``cos / T`` (host self-weight stays e¹).
        prop_attn: proportional attention with the squeezed sizes (not in the paper).
    """

    variant: str = "etps"
    keep_rate: float = 0.7
    layers: tuple[int, ...] = (3, 6, 9)
    temperature: float = 1.0
    prop_attn: bool = False


class TPS(KeepRateReducer):
    """eTPS: keep the top class-attention tokens, squeeze the rest into them."""

    name = "tps"
    Params = TPSParams

    def __init__(self, info: ModelInfo, params: TPSParams) -> None:
        variant = params.variant.lower() if isinstance(params.variant, str) else params.variant
        if variant not in VARIANTS:
            raise ValueError(f"tps: variant must be one of {', '.join(VARIANTS)}, got {params.variant!r}")
        if variant == "dtps":
            raise ValueError(
                "tps: variant 'dtps' needs a trained DynamicViT-style predictor and is not available yet; "
                "use variant='etps' (training-free)"
            )
        temperature = params.temperature
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"tps: temperature must be a number > 0, got {temperature!r}")
        super().__init__(info, params)
        self.temperature = float(temperature)
        self.prop_attn = bool(params.prop_attn)

    def reduce(self, block: int, state: TokenState, signals: AttentionSignals) -> TokenState:
        p = state.num_prefix
        patches = state.num_tokens - p
        keep = kept_count(self.keep_rate, patches)
        if keep >= patches:
            return state
        cls_attn = signals.cls_attn.mean(dim=1)[:, p:]  # B×(N−P)
        order = keep_topk(cls_attn, patches)  # all patch tokens, descending score
        return squeeze_state(state, order[:, :keep], order[:, keep:], self.temperature)
