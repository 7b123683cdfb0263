"""The reducer interface every method implements, and parameter handling."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from ..budget import CostModel, Schedule, resolve_budget
from ..ops.attention import AttentionNeeds, AttentionSignals, KeyMask
from ..state import TokenState


@dataclass(frozen=True)
class ModelInfo:
    """What a reducer may know about the model it runs in (never the model itself)."""

    depth: int
    dim: int
    num_heads: int
    num_prefix: int
    num_patches: int
    cost: CostModel
    num_classes: int = 0
    has_class_token: bool = True  # False: the signal ``cls_attn`` is the mean attention each key receives

    @property
    def num_tokens(self) -> int:
        return self.num_prefix + self.num_patches

    def unreduced_macs(self, num_tokens: int | None = None) -> float:
        n = self.num_tokens if num_tokens is None else num_tokens
        return self.cost.unreduced_macs(n, n - self.num_prefix)


class Reducer:
    """A token-reduction method bound to one model.

    Subclasses set ``name``, ``Params`` (a frozen dataclass whose fields are the
    method's public parameters, with the paper defaults) and ``knob`` (the
    parameter a ``budget`` resolves), and implement:

    * :meth:`needs` — attention signals wanted in block ``i`` (``None`` = no
      in-block reduction there);
    * :meth:`reduce` — the in-block reduction, after the attention residual and
      before the MLP;
    * :meth:`before_block` — an optional reduction between blocks;
    * :meth:`schedule` — the token counts the method produces, for GMACs and
      budgets;
    * :meth:`budget_candidates` — parameter overrides from least to most reduction.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type] = object
    knob: ClassVar[str] = ""
    learned: ClassVar[bool] = False  # has trained parameters (``self.module``), loaded with checkpoint=
    prop_attn: bool = False
    training: bool = False  # set by the adapter at every forward (the model's ``training`` flag)

    module: nn.Module | None = None  # the learned parameters of learned methods

    def __init__(self, info: ModelInfo, params: Any) -> None:
        self.info = info
        self.params = params

    # -- construction -------------------------------------------------------------
    @classmethod
    def create(cls, info: ModelInfo, budget: float | None = None, **kwargs: Any) -> Reducer:
        """Validate ``kwargs`` against ``Params`` and resolve ``budget`` into the knob."""
        fields = {f.name for f in dataclasses.fields(cls.Params)}
        unknown = sorted(set(kwargs) - fields)
        if unknown:
            raise TypeError(
                f"{cls.name}: unknown parameter(s) {', '.join(unknown)}; accepted: "
                f"{', '.join(sorted(fields))} and budget"
            )
        if budget is not None:
            if cls.knob in kwargs:
                raise ValueError(f"{cls.name}: pass either budget or {cls.knob!r}, not both")
            base = cls.Params(**kwargs)

            def cost_of(override: dict[str, Any]) -> float:
                reducer = cls(info, dataclasses.replace(base, **override))
                n = info.num_tokens
                return info.cost.macs(reducer.schedule(n), info.num_patches) + reducer.extra_macs(n)

            chosen = resolve_budget(
                budget, cls.budget_candidates(info, base), cost_of, info.unreduced_macs(), cls.knob
            )
            kwargs = {**kwargs, **chosen}
        return cls(info, cls.Params(**kwargs))

    @classmethod
    def budget_candidates(cls, info: ModelInfo, base: Any) -> Iterator[dict[str, Any]]:
        raise NotImplementedError(f"{cls.name} does not support budget=")

    def config(self) -> dict[str, Any]:
        """The resolved parameters, JSON-friendly."""
        out = {}
        for key, value in dataclasses.asdict(self.params).items():
            out[key] = list(value) if isinstance(value, tuple) else value
        return out

    # -- the forward hooks ----------------------------------------------------------
    def needs(self, block: int) -> AttentionNeeds | None:
        return None

    def reduce(self, block: int, state: TokenState, signals: AttentionSignals) -> TokenState:
        return state

    def key_mask(self, mask: Tensor) -> KeyMask:
        """How a carried live-token mask (B×N×1) enters attention; hard (−inf bias) by default."""
        return KeyMask(mask)

    def has_before_block(self, block: int) -> bool:
        return False

    def before_block(self, block: int, state: TokenState) -> TokenState:
        return state

    def schedule(self, num_tokens: int) -> Schedule:
        raise NotImplementedError

    def extra_macs(self, num_tokens: int) -> float:
        """MACs of the method's own learned modules per image (predictors); 0 by default."""
        return 0.0


def check_layers(name: str, layers: tuple[int, ...], depth: int) -> tuple[int, ...]:
    """Validate 0-based block indices."""
    layers = tuple(int(i) for i in layers)
    bad = [i for i in layers if not 0 <= i < depth]
    if bad:
        raise ValueError(f"{name}: layers {bad} out of range for a model with {depth} blocks (0..{depth - 1})")
    if len(set(layers)) != len(layers):
        raise ValueError(f"{name}: layers must not repeat, got {list(layers)}")
    return tuple(sorted(layers))


def check_fraction(name: str, key: str, value: float) -> float:
    if not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"{name}: {key} must be in (0, 1], got {value!r}")
    return float(value)
