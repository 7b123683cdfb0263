"""Token Cropr — cross-attention pruning (Bergner, Lippert & Mahendran, CVPR 2025).

A Cropr module sits between blocks (docs/methods.md#token-cropr): after every block except the last
(or, with last-layer fusion, except the last two).  Its scorer is ``M`` learned
queries dotted with the raw output tokens (no projections, no norm, one head):
``score_j = Σ_q q·x_j``.  The ``p`` lowest-scored patch tokens are removed (the
first module removes ``p + first_extra`` so later counts are round); survivors
come in score order; prefix tokens always stay.

Training (``model.train()``) prunes the same way (the ranking is not
differentiable) and additionally runs, on the *detached* tokens each module sees,
an aggregator — the same queries cross-attending with values (softmax over tokens,
scaled by 1/√C), a residual MLP (ratio 4) behind a LayerNorm with eps 1e-6 (the
official cls/cropr.py's ``mlp_norm``) and a LayerNorm (PyTorch's default eps
1e-5, as the official ``ClassificationHead``) + Linear head.  Its auxiliary
classification losses train the queries; the backbone gets no gradient from them.
The aggregators are not run at inference.

Initialisation follows the official code, where the ViT's ``init_weights`` (timm's
``init_weights_vit_timm``) reaches the Cropr modules: the queries are truncated
normal with std ``C^-½`` cut at ±2 std (``trunc_normal_tf_``), every Linear weight
truncated normal with std 0.02 (cut at ±2, i.e. effectively untruncated) and every
Linear bias zero; LayerNorms start at weight 1, bias 0.

With ``llf=True`` (last-layer fusion, the paper's default) the tokens each module
pruned are kept aside, frozen at the representation they had when pruned, and
concatenated back before the last block, which therefore sees every token.  This is
the generic rejoin of restoration (:meth:`~tokenreduce.state.TokenState.rejoin`, what
``restore="fusion"`` does for any pruning method): the pruned tokens rejoin after the
survivors, module by module and each module's in score order, with their own sizes and
rotary positions.

Segmentation form (``aux="segmentation"``, as the official ``segm/`` code): the auxiliary
head keeps one prediction per query, B×M×classes (no mean over the queries), so that with
one query per patch position (``num_queries`` = the patch count) each query predicts the
class of its patch; the training code reshapes them to the patch grid.  ``num_classes``
sets the auxiliary heads' classes (0: the model's).  The training curriculum sets
:attr:`Cropr.p_override` to raise the pruning rate from 0 to ``p``.

12-block port (the paper's classification setting is ViT-L, 24 blocks, p = 8):
``p=8``, modules after blocks 0…9, LLF on; DeiT-S: 197 → 188 → 180 → … → 116, 197
in block 11.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..budget import Schedule, before_block_schedule
from ..ops.modes import no_grad
from ..ops.prune import keep_topk
from ..state import TokenState
from .base import ModelInfo, Params, Reducer, boolean, checked, int_at_least, one_of

AUX_TASKS = ("classification", "segmentation")


@dataclass(frozen=True)
class CroprParams(Params):
    """Parameters of :class:`Cropr`.

    Attributes:
        p: tokens pruned by every module (the official ``pruning_rate``).
        llf: last-layer fusion (pruned tokens rejoin before the last block).
        num_queries: M learned queries per module (1 for classification; one per patch position for
            segmentation).
        first_extra: extra tokens removed by the first module (1: 197 → 188 with p=8).
        aux: the auxiliary heads' task: ``"classification"`` (B×classes logits, the queries' mean) or
            ``"segmentation"`` (B×M×classes, one prediction per query).
        num_classes: classes of the auxiliary heads; 0: the model's own.
    """

    p: int = checked(8, int_at_least(0))
    llf: bool = checked(True, boolean)
    num_queries: int = checked(1, int_at_least(1))
    first_extra: int = checked(1, int_at_least(0))
    aux: str = checked("classification", one_of(*AUX_TASKS))
    num_classes: int = checked(0, int_at_least(0))


class CroprModule(nn.Module):
    """Scorer queries plus the training-only aggregator and auxiliary head."""

    def __init__(self, dim: int, num_queries: int, num_classes: int, aux: str = "classification") -> None:
        super().__init__()
        self.aux = aux
        self.query = nn.Parameter(torch.empty(num_queries, dim))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.head_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, max(num_classes, 1))
        self.init_weights()

    def init_weights(self) -> None:
        """The official initialisation (module docstring).

        Queries ~ N(0, 1/C) cut at ±2 std; Linear weights ~ N(0, 0.02²) cut at ±2; Linear biases 0.
        """
        with torch.no_grad():
            nn.init.trunc_normal_(self.query, std=1.0, a=-2.0, b=2.0).mul_(self.query.shape[-1] ** -0.5)
        for layer in (*self.mlp, self.head):
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02, a=-2.0, b=2.0)
                nn.init.zeros_(layer.bias)

    def score(self, x: Tensor) -> Tensor:
        """B×N×C tokens → B×N unscaled scores ``Σ_q q·x``, in float32."""
        return x.float() @ self.query.float().sum(dim=0)

    def aggregate(self, x: Tensor) -> Tensor:
        """Auxiliary logits from detached tokens B×N×C: B×classes (classification: the mean over the
        queries), or B×M×classes (segmentation: one prediction per query)."""
        x = x.detach()
        attn = (self.query @ x.transpose(1, 2) / math.sqrt(x.shape[-1])).softmax(dim=-1)  # B×M×N
        z = attn @ x  # B×M×C
        z = z + self.mlp(self.norm(z))
        if self.aux == "segmentation":
            return self.head(self.head_norm(z))
        return self.head(self.head_norm(z.mean(dim=1)))


class Cropr(Reducer):
    """Learned cross-attention scorer pruning a fixed count after every block."""

    name = "cropr"
    recipe = "cropr"
    Params = CroprParams
    knob = "p"
    learned = True
    shipped = ("cropr",)
    shipped_segmentation = "cropr_seg"

    @classmethod
    def training_task(cls) -> type:
        from ..training.learned import CroprTask

        return CroprTask

    _p_override: int | None = None

    @property
    def p_override(self) -> int | None:
        """When set, every module prunes this many tokens instead of ``params.p`` (the first module still adds
        ``first_extra``, even at 0): the segmentation curriculum raises it from 0 to ``p``.  ``None``: ``p``.
        Not a parameter (not saved in checkpoints); a count that would leave no patch token is capped to
        leave one."""
        return self._p_override

    @p_override.setter
    def p_override(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"cropr: p_override must be None or an int >= 0, got {value!r}")
        self._p_override = value

    def __init__(self, info: ModelInfo, params: CroprParams) -> None:
        super().__init__(info, params)
        self.rejoins = params.llf  # last-layer fusion: the context's generic rejoin before the last block
        depth = info.depth
        last_module = depth - 3 if params.llf else depth - 2  # modules sit after blocks 0..last_module
        if last_module < 0:
            raise ValueError(f"cropr needs at least {3 if params.llf else 2} blocks")
        self.after_blocks = tuple(range(last_module + 1))
        modules = len(self.after_blocks)
        removed = params.p * modules + (params.first_extra if params.p else 0)
        if removed >= info.num_patches:
            largest = (info.num_patches - 1 - params.first_extra) // modules
            raise ValueError(
                f"cropr: p={params.p} over {modules} modules removes {removed} tokens but the model "
                f"has {info.num_patches} patch tokens; use p <= {largest}"
            )
        self.aux_logits: list[Tensor] = []

    def build_module(self) -> nn.ModuleList:
        """One scorer / aggregator per module position, officially initialised."""
        classes = self.params.num_classes or self.info.num_classes
        return nn.ModuleList(
            CroprModule(self.info.dim, self.params.num_queries, classes, self.params.aux) for _ in self.after_blocks
        )

    def has_before_block(self, block: int) -> bool:
        return block - 1 in self.after_blocks

    def _removed_by(self, module: int) -> int:
        if self.p_override is not None:
            return self.p_override + (self.params.first_extra if module == 0 else 0)
        return self.params.p + (self.params.first_extra if module == 0 and self.params.p else 0)

    def schedule(self, num_tokens: int) -> Schedule:
        def tokens_before(block: int, n: int) -> int:
            if self.params.llf and block == self.info.depth - 1:
                return num_tokens  # last-layer fusion: every pruned token rejoins
            if block - 1 in self.after_blocks:
                return n - min(self._removed_by(block - 1), n - self.info.num_prefix - 1)
            return n

        return before_block_schedule(num_tokens, self.info.depth, tokens_before)

    def extra_macs(self, num_tokens: int) -> float:
        """The scorers' MACs as :meth:`CroprModule.score` runs them: the M queries are summed first (M·C), then
        one dot product per token (N·C); ``Σ_q q·x = x·Σ_q q``, so M queries cost no more per token than one."""
        entering = [n for n, _ in self.schedule(num_tokens)]
        dim, queries = self.info.dim, self.params.num_queries
        return float(sum(entering[b] * dim + queries * dim for b in self.after_blocks))

    @classmethod
    def knob_values(cls, info: ModelInfo, base: CroprParams) -> range:
        modules = info.depth - (2 if base.llf else 1)
        return range(0, (info.num_patches - 1 - base.first_extra) // max(modules, 1) + 1)

    def before_block(self, block: int, state: TokenState) -> TokenState:
        index = block - 1
        module = self.module[index]
        if index == 0:
            self.aux_logits = []
        if self.training:
            self.aux_logits.append(module.aggregate(state.x))
        p = state.num_prefix
        patches = state.num_tokens - p
        keep = patches - min(self._removed_by(index), patches - 1)
        with no_grad():
            order = keep_topk(module.score(state.x[:, p:]), patches)
        # the pruned tokens, in score order, go to the archive (with last-layer fusion or restoration)
        return state.prefix_and_patches(order[:, :keep], order[:, keep:])
