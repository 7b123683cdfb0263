"""The reducer interface every method implements, and parameter handling."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor, nn

from ..budget import CostModel, Schedule, resolve_budget
from ..ops.attention import AttentionNeeds, AttentionSignals, KeyMask
from ..ops.matching import max_merges
from ..ops.unmerge import TokenGroups
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
    architecture: str = ""  # the model's architecture name where known (per-model defaults), else ""
    family: str = "timm-vit"  # the adapter's family name (checkpoints record it)

    @property
    def num_tokens(self) -> int:
        return self.num_prefix + self.num_patches

    def unreduced_macs(self, num_tokens: int | None = None) -> float:
        n = self.num_tokens if num_tokens is None else num_tokens
        return self.cost.unreduced_macs(n, n - self.num_prefix)


EvaluationRow = tuple[str, dict[str, Any], float | None]
"""``(label, params, budget)`` of one row of a default evaluation."""


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
    * :meth:`groups` — instead of reducing the stream, merge what a block's branches see (ToMe for SD);
    * :meth:`schedule` — the token counts the method produces, for GMACs and
      budgets;
    * :meth:`knob_values` — the values ``budget`` may give ``knob``, from least to
      most reduction (the cost must not increase along them);
    * :meth:`build_module` — learned methods: their freshly initialised parameters
      (built on first access of :attr:`module`, so budget resolution, which only
      needs schedules, never builds them).
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type] = object
    knob: ClassVar[str] = ""
    learned: ClassVar[bool] = False  # has trained parameters (``self.module``), loaded with checkpoint=
    paper_patches: ClassVar[int | None] = 196  # patch tokens the paper defaults were set for (DeiT at 224)
    budget_sets_schedule: ClassVar[bool] = True  # False: ``budget`` is a training target (LTMP), not a schedule
    seed_param: ClassVar[str | None] = None  # the parameter that seeds a random method (evaluated over seeds)
    recipe: ClassVar[str] = "deit"  # its paper's fine-tuning recipe (tokenreduce.training.recipes)
    shipped: ClassVar[tuple[str, ...]] = ()  # reducer checkpoints shipped for the bundled reference model
    shipped_segmentation: ClassVar[str | None] = None  # the reducer checkpoint shipped for the reference segmenter
    tasks: ClassVar[tuple[str, ...]] = ("classification", "segmentation")
    """The tasks whose default evaluations and sweeps list the method (any method runs when named)."""
    prop_attn: bool = False
    training: bool = False  # set by the adapter at every forward (the model's ``training`` flag)
    needs_vary: ClassVar[bool] = False
    """Whether :meth:`needs` depends on the reducer's state (its training flag, its learned values): the
    reduced model then asks for it again at every forward instead of once when the method is applied."""
    keeps_grid: ClassVar[bool] = False
    """Whether the stream keeps every patch token in its place (ToMe for SD merges only what the branches
    see): the model's grid entry points (``forward_intermediates``, feature-map backbones) then read the
    stream as it is, and need no ``restore=``."""
    packs_stream: ClassVar[bool] = False
    """Whether the method's inference reduction takes and gives the *packed stream* of a padded batch
    (``TokenState.packing``: only the live tokens' hidden states, ΣN×C): the reduced model then keeps the
    stream packed between blocks, so no block gathers its live rows from a padded B×N×C tensor or scatters
    them back (:func:`tokenreduce.models.base.branches`)."""
    rejoins: bool = False
    """Whether the pruned tokens rejoin before the last block (last-layer fusion: Cropr's ``llf``); the
    reduction context then archives pruned tokens and rejoins them (:meth:`TokenState.rejoin`)."""
    restore: str | None = None
    """The restoration the method was applied with (``tr.apply(..., restore=...)``): ``None``, ``"frozen"``
    or ``"fusion"``.  Set by :func:`tokenreduce.apply`; not a parameter (not in :meth:`config`)."""

    _module: nn.Module | None = None

    def __init__(self, info: ModelInfo, params: Any) -> None:
        self.info = info
        self.params = params

    # -- learned parameters ----------------------------------------------------------
    @property
    def module(self) -> nn.Module | None:
        """The learned parameters (``None`` for training-free methods), built on first access."""
        if self._module is None and self.learned:
            self._module = self.build_module()
        return self._module

    @module.setter
    def module(self, value: nn.Module | None) -> None:
        self._module = value

    def build_module(self) -> nn.Module | None:
        """Freshly initialised learned parameters (learned methods override this)."""
        return None

    # -- what evaluation, training and the CLI ask of a method ------------------------------
    @classmethod
    def paper_default_fits(cls, info: ModelInfo) -> bool:
        """Whether the paper defaults mean something on this model (it has the token grid they were set for)."""
        return cls.paper_patches is None or info.num_patches == cls.paper_patches

    @classmethod
    def evaluation_rows(cls, info: ModelInfo, budgets: Sequence[float], task: str = "classification",
                        ) -> list[EvaluationRow]:
        """``(label, params, budget)`` rows of a default evaluation on a model: the paper default where
        it fits the model, then one row per budget.  ``task``: ``"classification"`` or ``"segmentation"``
        (a method may show a setting that matters for one task only)."""
        rows: list[EvaluationRow] = []
        if task not in cls.tasks:
            return rows
        if cls.paper_default_fits(info):
            rows.append((f"{cls.name} (default)", {}, None))
        rows += [(f"{cls.name}@{b:g}", {}, b) for b in budgets]
        return rows

    @classmethod
    def shipped_checkpoint(cls, params: dict[str, Any], budget: float | None = None) -> Path | None:
        """The reducer checkpoint shipped for the bundled reference model that serves ``params`` and
        ``budget``, or ``None`` (nothing to load, or nothing shipped)."""
        if not cls.shipped:
            return None
        from ..models.reference import shipped_reducer

        return shipped_reducer(cls.shipped[0])

    @classmethod
    def shipped_segmentation_checkpoint(cls, params: dict[str, Any], budget: float | None = None) -> Path | None:
        """The reducer checkpoint shipped for the bundled reference segmenter that serves ``params`` and
        ``budget``, or ``None``.  Its metadata may name the segmenter weights it was trained end to end with."""
        if cls.shipped_segmentation is None:
            return None
        from ..models.reference import shipped_reducer

        return shipped_reducer(cls.shipped_segmentation)

    def needs_calibration(self, params: dict[str, Any]) -> bool:
        """Whether a parameter the user left at its default must be calibrated on data for this model."""
        return False

    def calibrate(self, model: nn.Module, images: Tensor, budget: float | None, params: dict[str, Any]) -> Any:
        """Calibrate the applied ``model`` on ``images`` (B×C×H×W); returns the chosen value."""
        raise NotImplementedError(f"{self.name} has nothing to calibrate")

    @classmethod
    def training_task(cls) -> type | None:
        """The task class that trains this method's parameters (:mod:`tokenreduce.training.learned`),
        or ``None`` for a method with nothing to train.  Imported lazily: training is optional."""
        return None

    # -- construction -------------------------------------------------------------
    @classmethod
    def resolve(cls, params: dict[str, Any]) -> tuple[type[Reducer], dict[str, Any]]:
        """The class and parameters that ``params`` select (an alias may name another method's class)."""
        return cls, params

    @classmethod
    def create(cls, info: ModelInfo, budget: float | None = None, **kwargs: Any) -> Reducer:
        """Validate ``kwargs`` against ``Params`` and resolve ``budget`` into the knob."""
        target, kwargs = cls.resolve(kwargs)
        if target is not cls:
            return target.create(info, budget=budget, **kwargs)
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
            base = cls.build_params(kwargs)

            def cost_of(value: Any) -> float:  # from the schedule alone: no learned module is built
                reducer = cls(info, dataclasses.replace(base, **{cls.knob: value}))
                n = info.num_tokens
                return info.cost.macs(reducer.schedule(n), info.num_patches) + reducer.extra_macs(n)

            value = resolve_budget(budget, cls.knob_values(info, base), cost_of, info.unreduced_macs(), cls.knob)
            kwargs = {**kwargs, cls.knob: value}
        return cls(info, cls.build_params(kwargs))

    @classmethod
    def build_params(cls, kwargs: dict[str, Any]) -> Any:
        """``Params(**kwargs)``, validated; a bad value's ``ValueError`` names the method."""
        try:
            return cls.Params(**kwargs)
        except ValueError as err:
            raise ValueError(f"{cls.name}: {err}") from None

    @classmethod
    def knob_values(cls, info: ModelInfo, base: Any) -> Sequence[Any]:
        """The values a ``budget`` may give :attr:`knob`, from least to most reduction."""
        raise NotImplementedError(f"{cls.name} does not support budget=")

    def config(self) -> dict[str, Any]:
        """The resolved parameters, JSON-friendly."""
        out = {}
        for key, value in dataclasses.asdict(self.params).items():
            out[key] = list(value) if isinstance(value, tuple) else value
        return out

    # -- the forward hooks ----------------------------------------------------------
    def needs(self, block: int) -> AttentionNeeds | None:
        """What block ``block``'s attention must return besides its output (``None``: nothing)."""
        return None

    def needs_per_block(self) -> list[AttentionNeeds | None]:
        """:meth:`needs` for every block (what the reduced model asks for, once or per forward with
        :attr:`needs_vary`); a method whose answers read learned values may read them all at once."""
        return [self.needs(i) for i in range(self.info.depth)]

    def reduce(self, block: int, state: TokenState, signals: AttentionSignals) -> TokenState:
        return state

    def end_forward(self) -> None:
        """Called by the reduced model after the last block of every forward (a method that keeps values for the
        length of one forward drops them here)."""

    def key_mask(self, mask: Tensor) -> KeyMask:
        """How a carried live-token mask (B×N×1) enters attention; hard (−inf bias) by default."""
        return KeyMask(mask)

    def has_before_block(self, block: int) -> bool:
        return False

    def before_block(self, block: int, state: TokenState) -> TokenState:
        return state

    def has_groups(self, block: int) -> bool:
        """Whether block ``block``'s branches run on merged groups of the stream (:meth:`groups`)."""
        return False

    def groups(self, block: int, state: TokenState) -> TokenGroups:
        """Merged branches (ToMe for SD): how block ``block``'s attention and MLP see the stream's tokens, as
        group means whose outputs are copied back to every token of the group; the stream keeps all its
        tokens.  Called where :meth:`has_groups` says so, instead of :meth:`needs` / :meth:`reduce`."""
        raise NotImplementedError(f"{self.name} does not merge branches")

    def schedule(self, num_tokens: int) -> Schedule:
        raise NotImplementedError

    def extra_macs(self, num_tokens: int) -> float:
        """MACs of the method's own learned modules per image (predictors); 0 by default."""
        return 0.0


KEEP_RATE_STEP = 0.001  # budget resolution of keep rates: 1.000, 0.999, ..., 0.001


def keep_rate_values() -> list[float]:
    """Keep rates from 1 down to ``KEEP_RATE_STEP`` (the knob values of keep-rate methods)."""
    steps = round(1.0 / KEEP_RATE_STEP)
    return [round(i * KEEP_RATE_STEP, 3) for i in range(steps, 0, -1)]


def merge_count_values(info: ModelInfo) -> range:
    """``r`` from 0 to the most one bipartite matching can merge (the knob values of merging methods)."""
    return range(max_merges(info.num_tokens, info.num_prefix) + 1)


def check_layers(name: str, layers: tuple[int, ...], depth: int) -> tuple[int, ...]:
    """Validate 0-based block indices: a non-empty sequence of distinct ints in ``[0, depth)``; returns them sorted.

    Raises:
        ValueError: not a sequence of ints, empty (a layered method with no layer would silently
            reduce nothing), out of range, or repeated.
    """
    if not isinstance(layers, (tuple, list)) or any(isinstance(i, bool) or not hasattr(i, "__index__") for i in layers):
        raise ValueError(f"{name}: layers must be a sequence of 0-based block indices (ints), got {layers!r}")
    if not layers:
        raise ValueError(
            f"{name}: empty layers would reduce nothing; give at least one block (0..{depth - 1}), "
            "or use the unreduced model (tokenreduce.remove)"
        )
    layers = tuple(int(i) for i in layers)
    bad = [i for i in layers if not 0 <= i < depth]
    if bad:
        raise ValueError(f"{name}: layers {bad} out of range for a model with {depth} blocks (0..{depth - 1})")
    if len(set(layers)) != len(layers):
        raise ValueError(f"{name}: layers must not repeat, got {list(layers)}")
    return tuple(sorted(layers))


# -- parameter validation ------------------------------------------------------------------------------
#
# Every method's ``Params`` dataclass derives from :class:`Params` and declares its checked fields with
# :func:`checked`: the values are validated (and normalised) when the dataclass is built, before any model
# work.  Checks that need the model (block indices against the depth, counts against the patches) stay in
# the reducer's ``__init__``.

Check = Callable[[str, Any], Any]
"""``(field name, value) -> normalised value``; raises ``ValueError`` naming the field."""


def checked(default: Any, check: Check) -> Any:
    """A dataclass field whose value ``check`` validates when the parameters are built."""
    return field(default=default, metadata={"check": check})


@dataclass(frozen=True)
class Params:
    """Base of the methods' parameter dataclasses: runs every field's :func:`checked` validator."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check = f.metadata.get("check")
            if check is not None:
                object.__setattr__(self, f.name, check(f.name, getattr(self, f.name)))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def fraction(key: str, value: Any) -> float:
    """A number in (0, 1]."""
    if not _is_number(value) or not 0.0 < value <= 1.0:
        raise ValueError(f"{key} must be in (0, 1], got {value!r}")
    return float(value)


def positive(key: str, value: Any) -> float:
    """A number > 0."""
    if not _is_number(value) or not value > 0:
        raise ValueError(f"{key} must be a number > 0, got {value!r}")
    return float(value)


def boolean(key: str, value: Any) -> bool:
    """``True`` or ``False``."""
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be True or False, got {value!r}")
    return value


def integer(key: str, value: Any) -> int:
    """Any int."""
    if not _is_int(value):
        raise ValueError(f"{key} must be an int, got {value!r}")
    return value


def int_at_least(low: int) -> Check:
    """An int >= ``low``."""

    def check(key: str, value: Any) -> int:
        if not _is_int(value) or value < low:
            raise ValueError(f"{key} must be an int >= {low}, got {value!r}")
        return value

    return check


def optional(check: Check) -> Check:
    """``None``, or a value ``check`` accepts."""
    return lambda key, value: None if value is None else check(key, value)


def one_of(*choices: str) -> Check:
    """One of ``choices`` (case-insensitive; returned lower-case)."""

    def check(key: str, value: Any) -> str:
        if not isinstance(value, str) or value.lower() not in choices:
            raise ValueError(f"{key} must be one of {', '.join(choices)}, got {value!r}")
        return value.lower()

    return check


def number_in(low: float, high: float) -> Check:
    """One number in [low, high]."""

    def check(key: str, value: Any) -> float:
        if not _is_number(value) or not low <= value <= high:
            raise ValueError(f"{key} must be a number in [{low:g}, {high:g}], got {value!r}")
        return float(value)

    return check


def numbers_in(low: float, high: float) -> Check:
    """One number in [low, high], or a sequence of them (returned as a tuple)."""

    def check(key: str, value: Any) -> float | tuple[float, ...]:
        values = value if isinstance(value, (tuple, list)) else (value,)
        if not values or not all(_is_number(v) and low <= v <= high for v in values):
            raise ValueError(f"{key} needs numbers in [{low:g}, {high:g}] (one, or one per block), got {value!r}")
        return tuple(float(v) for v in value) if isinstance(value, (tuple, list)) else float(value)

    return check


def block_indices(key: str, value: Any) -> tuple[int, ...]:
    """A non-empty sequence of distinct ints (their range is checked against the model's depth later)."""
    if not isinstance(value, (tuple, list)) or any(not _is_int(i) for i in value):
        raise ValueError(f"{key} must be a sequence of 0-based block indices (ints), got {value!r}")
    if not value:
        raise ValueError(f"empty {key} would reduce nothing; give at least one block, "
                         "or use the unreduced model (tokenreduce.remove)")
    if len(set(value)) != len(value):
        raise ValueError(f"{key} must not repeat, got {list(value)}")
    return tuple(value)
