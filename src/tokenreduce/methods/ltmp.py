"""LTMP — Learned Thresholds Merging and Pruning (Bonnaerens & Dambre, TMLR 2023).

In every block, after the attention residual and before the MLP (docs/methods.md#ltmp):

1. **merge**: ToMe's parity split (A = even, B = odd positions of the current
   sequence); an A token merges into its most similar B token (cosine of the
   head-averaged keys) iff that similarity exceeds the block's learned
   ``merge_threshold``; size-weighted average, sizes tracked, proportional
   attention on;
2. **prune**: a token is dropped iff the attention it *receives* (mean over heads
   and query rows) is below the block's learned ``prune_threshold``; a merge
   destination takes the maximum importance of its group; prefix tokens never go.

With no B token left (only one token, e.g. the class token alone) nothing merges and
only the prune rule applies.

Two forms behind one reducer, chosen by the model's mode:

* **training** (``model.train()``): fixed shape; a live-token mask is carried and
  applied as a masked softmax (eps 1e-5); decisions are straight-through hard
  masks with the gradient of ``sigmoid((score − θ)/τ)``; the sequence is laid out
  as [prefix, A, B] every block, like the inference order.  Gradients follow the
  official ``LTMPBlock``: the similarity and importance scores are not detached;
  the merge weights are (merged values carry no gradient to ``θ_merge``); a live
  token that merges away gets mask ``1 − merge``, any other live token this
  block's prune decision ``keep`` (so its earlier decisions' gradients end there),
  and a dead token keeps the mask, and gradient path, it died with; prefix tokens
  get ``keep = 1`` exactly, with zero gradient (the official +∞ importance).
* **inference** (``model.eval()``): real removal.  Each image keeps a different
  number of tokens, so a batch is run *padded*: survivors are compacted to the
  front, the sequence is cut to the largest count in the batch (rounded up to a
  multiple of the CPU's vector width, :func:`length_multiple`), and the padding is removed from attention with a −inf
  key bias (fused SDPA kept).  Every image's result equals running it alone.  The
  per-token work runs on the live tokens only, and between blocks the stream stays packed
  (``packs_stream``: ``TokenState.packing``, only the live rows, ΣN×C; the merge/prune kernel reads
  and writes them).  The prune rule only compares the attention a token receives with the threshold,
  so on the CPU the fused kernel serves every image whose tokens it can certify above the threshold (a
  lower bound from its log-sum-exp, :func:`~tokenreduce.ops.attention.attention_with_received_floor`),
  in length buckets for a padded batch (:func:`~tokenreduce.ops.attention.attend_bucketed`: each group
  of images of similar length at its own longest length, one C++ call where the kernels are built);
  elsewhere the explicit softmax runs, on chunks of images of similar length for a padded batch
  (:func:`~tokenreduce.ops.attention.attend_ragged`).  With batch size 1 there is no padding at all.
  On the CPU the whole step runs as one fused kernel
  (:func:`~tokenreduce.ops.cpu_kernels.fused_ltmp_merge_prune`) unless sources or restoration are tracked:
  it takes the keys, as the per-head keys where the attention has them (``AttentionNeeds.keys_as_heads``:
  no separate head-mean op), computes each image's similarities row by row (the Python path's to
  rounding, ~1e-7) and gives the Python path's numbers bit for bit after them, the next block's
  proportional-attention bias (``log size``, ``TokenState.size_bias``) included.

Choices where the official code is ambiguous (documented, exposed):

* ``tau`` defaults to **0.5**: the model code and README say 0.1, but the training
  script's default is 0.5 and the published reproduction command does not
  override it, so 0.5 is what produced the paper's numbers.
* Importance averages over **live** query rows only, in both forms (the official
  training form averages over all rows, masked ones included, which its inference
  form cannot see); this keeps training and inference consistent (docs/methods.md#ltmp).
  Which rows count carries no gradient (the official average has no such path).
* In the training form, already-removed tokens neither merge nor receive merges.
* At inference a block whose prune threshold is exactly 0 prunes nothing and skips the attention
  probabilities (fused attention kernel): a token's received attention is a mean of softmax
  probabilities, positive unless it underflows to 0, where the official rule would prune it.
* Cosine similarities are clamped to at most 1 (rounding can put two identical tokens' cosine a few
  ulps above it), so a merge threshold of 1, where learned thresholds saturate, merges nothing, as in
  exact arithmetic.  Such a block still lays its tokens out as [prefix, A, B] for the next block's
  split, so it is not skipped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..budget import Schedule
from ..ops.attention import AttentionNeeds, AttentionSignals, KeyMask, flash_multiple
from ..ops.cpu_kernels import fused_ltmp_merge_prune
from ..ops.gather import batched_gather, batched_scatter_add, head_mean
from ..ops.modes import no_grad, tracing
from ..ops.prune import threshold_mask
from ..ops.ragged import rounded_length
from ..ops.similarity import alternate, unit_rows
from ..state import Packing, TokenState
from .base import ModelInfo, Params, Reducer, boolean, checked, fraction, numbers_in, positive

Thresholds = float | tuple[float, ...]

def length_multiple(batch: int) -> int:
    """What the padded length of ``batch`` images is rounded up to at inference: a multiple of
    :func:`~tokenreduce.ops.attention.flash_multiple` (8 or 16: the extra rows are dead; ATen's CPU flash kernel
    runs up to twice as fast on such lengths, docs/benchmarks.md#ltmp-speed-on-deit-s), or of 1 for a single image
    (no dead rows, no mask)."""
    return flash_multiple() if batch > 1 else 1


def padded_length(longest: int, n: int, batch: int) -> int:
    """A batch's padded length after a step: ``longest`` rounded up to :func:`length_multiple`, at most ``n``."""
    return rounded_length(longest, length_multiple(batch), n)


@dataclass(frozen=True)
class LTMPParams(Params):
    """Parameters of :class:`LTMP`.

    Attributes:
        merge_threshold: initial θ_merge per block (a float for all blocks or a tuple);
            0.9 is the paper's initialisation for merge-and-prune.
        prune_threshold: initial θ_prune per block; 0.0 (nothing pruned) initially.
        tau: temperature of the threshold-masking sigmoid (see the module note).
        target: fraction of the unreduced GMACs the training regulariser aims at
            (``budget`` sets it); the thresholds, not this, act at inference.
        prop_attn: proportional attention.
    """

    merge_threshold: Thresholds = checked(0.9, numbers_in(0.0, 1.0))
    prune_threshold: Thresholds = checked(0.0, numbers_in(0.0, 1.0))
    tau: float = checked(0.5, positive)
    target: float = checked(0.75, fraction)
    prop_attn: bool = checked(True, boolean)


class LTMPThresholds(nn.Module):
    """The learned parameters: one merge and one prune threshold per block (2·depth scalars)."""

    def __init__(self, merge: list[float], prune: list[float]) -> None:
        super().__init__()
        self.merge_threshold = nn.Parameter(torch.tensor(merge, dtype=torch.float32))
        self.prune_threshold = nn.Parameter(torch.tensor(prune, dtype=torch.float32))

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep thresholds in [0, 1] (applied after every optimiser step)."""
        self.merge_threshold.clamp_(0.0, 1.0)
        self.prune_threshold.clamp_(0.0, 1.0)


def _per_block(name: str, key: str, value: Thresholds, depth: int) -> list[float]:
    values = [float(value)] * depth if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != depth or not all(0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"{name}: {key} needs one value in [0, 1] or {depth} of them, got {value!r}")
    return values


class LTMP(Reducer):
    """Learned-threshold merging then pruning in every block."""

    name = "ltmp"
    recipe = "ltmp"
    Params = LTMPParams
    knob = "target"
    learned = True
    shipped = ("ltmp_0.75", "ltmp_0.6")  # trained for targets 0.75 and 0.6
    budget_sets_schedule = False
    packs_stream = True  # at inference its reduction takes and gives the packed stream (TokenState.packing)

    @classmethod
    def evaluation_rows(cls, info: ModelInfo, budgets: Sequence[float], task: str = "classification",
                        ) -> list[tuple[str, dict[str, Any], None]]:
        """One row per budget, as the training target (LTMP's counts depend on the images, so its
        budget is what its thresholds were trained for, not a schedule)."""
        return [(f"ltmp (target {b:g})", {"target": b}, None) for b in budgets]

    @classmethod
    def shipped_checkpoint(cls, params: dict[str, Any], budget: float | None = None) -> Path | None:
        """The shipped thresholds trained for the target closest to the asked one (``params["target"]``,
        else ``budget``, else the default 0.75); the checkpoint's name says which."""
        from ..models.reference import shipped_reducer

        target = float(params.get("target", budget if budget is not None else LTMPParams.target))
        trained = {float(stem.split("_", 1)[1]): stem for stem in cls.shipped}
        return shipped_reducer(trained[min(trained, key=lambda t: abs(t - target))])

    @classmethod
    def training_task(cls) -> type:
        from ..training.learned import LTMPTask

        return LTMPTask

    def __init__(self, info: ModelInfo, params: LTMPParams) -> None:
        super().__init__(info, params)
        merge = _per_block(self.name, "merge_threshold", params.merge_threshold, info.depth)
        prune = _per_block(self.name, "prune_threshold", params.prune_threshold, info.depth)
        self._initial_thresholds = (merge, prune)
        self.prop_attn = params.prop_attn
        # (merge, prune parameters, their versions and data pointers, their values): see _host_thresholds
        self._host_cache: tuple[Tensor, Tensor, tuple[int, ...], list[float], list[float]] | None = None
        # this forward's thresholds as Python floats, read at its start, dropped at its end (eager inference only)
        self._forward_thresholds: tuple[list[float], list[float]] | None = None
        self._needs_cache: tuple[list[float], list[AttentionNeeds]] | None = None  # (prune thresholds, needs)

    def build_module(self) -> LTMPThresholds:
        """The thresholds at their initial values."""
        return LTMPThresholds(*self._initial_thresholds)

    @classmethod
    def create(cls, info: ModelInfo, budget: float | None = None, **kwargs: Any) -> Reducer:
        """``budget`` is LTMP's training target (its counts depend on the images)."""
        if budget is not None:
            if "target" in kwargs:
                raise ValueError("ltmp: pass either budget or 'target', not both")
            kwargs["target"] = budget
        return super().create(info, **kwargs)

    def config(self) -> dict[str, Any]:
        out = super().config()
        out["merge_threshold"] = [round(v, 6) for v in self.module.merge_threshold.tolist()]
        out["prune_threshold"] = [round(v, 6) for v in self.module.prune_threshold.tolist()]
        return out

    needs_vary = True  # a block whose prune threshold is 0 needs no attention probabilities at inference

    def needs(self, block: int) -> AttentionNeeds:
        """Keys always; the attention received unless, at inference, the block's prune threshold is 0:
        received attention is positive (softmax), so nothing can be pruned.  At inference the prune rule only
        compares the received attention with the threshold, so the threshold goes along as its floor
        (``AttentionNeeds.received_floor``): the fused kernel serves every image it can certify."""
        return self.needs_per_block()[block]

    def needs_per_block(self) -> list[AttentionNeeds]:
        """:meth:`needs` for every block, reading the thresholds with one host transfer.

        A reduced model calls this at the start of every forward; at inference in eager mode the values read are
        also the thresholds every block's :meth:`reduce` compares with during that forward."""
        if self.training or tracing() or self._module is None:
            self._forward_thresholds = None
            return [AttentionNeeds(keys=True, received=True)] * self.info.depth
        merge, prune = self._host_thresholds(refresh=True)  # once per forward: also sees changes through .data
        self._forward_thresholds = (merge, prune)
        cached = self._needs_cache
        if cached is None or cached[0] != prune:
            # the per-head keys will do: the fused kernel averages them itself (no separate head-mean op)
            cached = self._needs_cache = (prune, [
                AttentionNeeds(keys=True, keys_as_heads=True) if theta <= 0.0 else
                AttentionNeeds(keys=True, keys_as_heads=True, received=True, received_floor=theta)
                for theta in prune])
        return cached[1]

    def end_forward(self) -> None:
        self._forward_thresholds = None  # a reduce called outside a forward reads the parameters again

    def _host_thresholds(self, refresh: bool = False) -> tuple[list[float], list[float]]:
        """The merge and prune thresholds as Python floats, read with one host transfer, so that at inference
        every block compares with them without a device-to-host read of its own.

        A reduced model calls this with ``refresh`` at the start of every forward (:meth:`needs_per_block`),
        so a forward always sees the current values.  Between forwards the kept values are read again when
        the parameters are replaced, re-pointed or changed in place by an autograd-visible op (an optimiser
        step, ``load_state_dict``); changes made through ``.data`` are seen from the next forward on."""
        merge, prune = self.module.merge_threshold, self.module.prune_threshold
        key = (merge._version, prune._version, merge.data_ptr(), prune.data_ptr())
        cache = self._host_cache
        if refresh or cache is None or cache[0] is not merge or cache[1] is not prune or cache[2] != key:
            cache = self._host_cache = (merge, prune, key, merge.tolist(), prune.tolist())
        return cache[3], cache[4]

    def key_mask(self, mask: Tensor) -> KeyMask:
        return KeyMask(mask, soft=self.training, eps=1e-5)

    def schedule(self, num_tokens: int) -> Schedule:
        raise NotImplementedError(
            "ltmp keeps a different number of tokens for every image: run a forward and read tokenreduce.stats"
        )

    # -- the reduction ---------------------------------------------------------------
    def reduce(self, block: int, state: TokenState, signals: AttentionSignals) -> TokenState:
        """Block ``block``'s merge and prune (the module note).  Inside a reduced model's eager inference forward the
        thresholds are those :meth:`needs_per_block` read at the forward's start (no check of the parameters per
        block); elsewhere they are read here."""
        if self.training:
            module = self.module
            return self._reduce_soft(state, self._received(state, signals), module.merge_threshold[block],
                                     module.prune_threshold[block])
        snapshot = self._forward_thresholds
        if snapshot is not None:
            theta_m, theta_p = snapshot[0][block], snapshot[1][block]
        elif tracing():  # a graph keeps the thresholds as its parameters
            module = self.module
            theta_m, theta_p = module.merge_threshold[block], module.prune_threshold[block]
        else:
            merge, prune = self._host_thresholds()
            theta_m, theta_p = merge[block], prune[block]
        next_block = block + 1 < self.info.depth
        if not torch.is_grad_enabled():  # the usual inference: no with-block (it costs even where it changes nothing)
            return self._reduce_hard(state, signals, theta_m, theta_p, next_block)
        with no_grad():
            return self._reduce_hard(state, signals, theta_m, theta_p, next_block)

    @staticmethod
    def _received(state: TokenState, signals: AttentionSignals) -> AttentionSignals:
        """``signals`` with the attention received filled in: +inf for every token where the block computed
        none (prune threshold 0, see :meth:`needs`), so every importance passes the threshold."""
        if signals.received is not None:
            return signals
        return dataclasses.replace(signals, received=state.x.new_full(state.x.shape[:2], torch.inf,
                                                                      dtype=torch.float32))

    def _scores(
        self, state: TokenState, signals: AttentionSignals, live: Tensor, sim: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Best A→B cosine (B×NA), partner (B×NA) and received attention (B×N), in float32.

        Prefix A rows and dead rows score −inf; prefix and dead B columns are never partners.
        With no B tokens at all (a single token left, e.g. only the class token) every row
        scores −inf and the partners are 0 (unused).  Nothing is detached: in the training
        form the similarities and the importances carry gradients, as in the official code.
        """
        p, n = state.num_prefix, state.num_tokens
        sim = self._similarity(signals) if sim is None else sim  # B×NA×NB
        pos = torch.arange(n, device=sim.device)
        ok_a = (pos[::2] >= p) & live[:, ::2]
        ok_b = (pos[1::2] >= p) & live[:, 1::2]
        sim = sim.masked_fill(~ok_b.unsqueeze(1), -torch.inf).masked_fill(~ok_a.unsqueeze(2), -torch.inf)
        if sim.shape[-1] == 0:  # no B token to merge into
            best = sim.new_full(sim.shape[:2], -torch.inf)
            partner = torch.zeros(sim.shape[:2], dtype=torch.long, device=sim.device)
        else:
            best, partner = sim.max(dim=-1)
        importance = signals.received.float()  # attention received, mean over heads and live query rows
        return best, partner, importance

    @staticmethod
    def _keys(signals: AttentionSignals) -> Tensor:
        """The keys the similarities compare: B×N×d head means, or the B×H×N×d per-head keys where the attention
        gave those instead (``AttentionNeeds.keys_as_heads``)."""
        return signals.keys if signals.keys is not None else signals.head_keys

    @staticmethod
    def _similarity(signals: AttentionSignals) -> Tensor:
        """B×NA×NB cosine similarities (at most 1) of the head-averaged keys, A (even) to B (odd) positions, float32."""
        keys = LTMP._keys(signals)
        keys = head_mean(keys) if keys.dim() == 4 else keys
        keys = keys if keys.dtype == torch.float32 else keys.float()
        metric_a, metric_b = alternate(unit_rows(keys))
        sim = metric_a @ metric_b.transpose(-1, -2)
        # at most 1, as a cosine is: a threshold of 1 then merges nothing on any path (see the module note)
        return sim.clamp(max=1.0) if sim.requires_grad else sim.clamp_(max=1.0)

    @staticmethod
    def _layout(n: int, p: int, device: torch.device) -> Tensor:
        """Positions in output order: prefix, then A (even) and B (odd) non-prefix positions."""
        pos = torch.arange(n, device=device)  # slices, not boolean masks: static sizes for torch.export
        return torch.cat([pos[:p], pos[2 * ((p + 1) // 2) :: 2], pos[2 * (p // 2) + 1 :: 2]])

    def _reduce_hard(
        self, state: TokenState, signals: AttentionSignals, theta_m: Tensor | float, theta_p: Tensor | float,
        next_block: bool = True,
    ) -> TokenState:
        """Inference form: hard comparisons, merged and pruned tokens really removed (batch padded).  The
        thresholds are Python floats, or 0-d tensors while a graph is captured.  ``next_block``: a block follows,
        whose attention takes the size bias (the fused kernel then computes it with the step)."""
        p = state.num_prefix
        if state.source is None and state.owner is None:  # the fused CPU kernel, where eligible: the same decisions
            packing = state.packing
            keys = self._keys(signals)
            bsz = keys.shape[0]
            fused = fused_ltmp_merge_prune(
                state.x, state.size, None, signals.received, None if packing is not None else state.mask, theta_m,
                theta_p, p, length_multiple(bsz), counts=None if packing is None else packing.counts,
                packed=packing is not None, keys=keys, with_index=state.pos is not None,
                with_log_size=self.prop_attn and next_block)
            if fused is not None:
                pos = None if state.pos is None else batched_gather(state.pos, fused.index)
                out_x, packing = fused.x, None
                if fused.rows is not None:  # a packed stream stays packed, unless every row is live
                    if fused.mask is None:
                        out_x = out_x.view(bsz, -1, out_x.shape[-1])
                    else:
                        packing = Packing(fused.rows, fused.counts)
                return state.stepped(out_x, fused.size, fused.mask, pos, packing, fused.log_size)
        if state.packing is not None:  # the Python path runs on the padded layout (the caller packs it again)
            state = state.unpacked()
        sim = self._similarity(signals)
        x = state.x
        signals = self._received(state, signals)
        bsz, n, _ = x.shape
        live = torch.ones(bsz, n, dtype=torch.bool, device=x.device) if state.mask is None else state.mask[..., 0] > 0
        best, partner, importance = self._scores(state, signals, live, sim)
        merge = best > theta_m  # B×NA; −inf rows never merge
        size = state.sizes()
        w = merge.unsqueeze(-1).float() * size[:, ::2]  # B×NA×1 merge weights
        merged_b, den = _merge_into_b(x.float(), size, w, partner)
        imp_a = importance[:, ::2]
        imp_b = _group_max(importance[:, 1::2], partner, imp_a, merge)
        prefix = torch.arange(n, device=x.device) < p  # prefix tokens are never pruned

        x_full, size_full = x.clone(), size.clone()
        x_full[:, 1::2] = merged_b.to(x.dtype)
        size_full[:, 1::2] = den
        alive = live.clone()
        alive[:, ::2] &= ~merge & ((imp_a > theta_p) | prefix[::2])
        alive[:, 1::2] &= (imp_b > theta_p) | prefix[1::2]
        source = state.source
        if source is not None:
            source = source.clone()
            source[:, 1::2] = _group_max(source[:, 1::2], partner, source[:, ::2], merge)

        # compact: live tokens first, in layout order; cut to the largest count in the batch, rounded up
        layout = self._layout(n, p, x.device)
        rank = torch.empty_like(layout).scatter_(0, layout, torch.arange(n, device=x.device))
        order = torch.argsort(rank + (~alive) * n, dim=1)
        if torch.compiler.is_exporting():  # a graph cannot cut to a data-dependent length: padded to N
            index = order
        else:  # host sync: the padded length, the longest image's rounded up (length_multiple)
            index = order[:, : padded_length(int(alive.sum(dim=1).max()), n, bsz)]
        # positions stay: a B token that absorbs A tokens is their destination and keeps its own;
        # with restoration tracked, merged tokens' originals follow them and pruned ones are archived
        full = dataclasses.replace(state, x=x_full, size=size_full, source=source, mask=alive.unsqueeze(-1).float())
        out = full.redirect(_merge_targets(merge, partner, n)).gather(index)
        if not torch.compiler.is_exporting() and bool(out.mask.all()):
            out = dataclasses.replace(out, mask=None)
        return out

    def _reduce_soft(
        self, state: TokenState, signals: AttentionSignals, theta_m: Tensor, theta_p: Tensor
    ) -> TokenState:
        """Training form: fixed shape, straight-through decisions, a carried B×N×1 live-token mask.

        Forward values are those of the inference form.  Gradients follow the official
        ``LTMPBlock`` (ltmp/timm/lt_mergeprune.py):

        * merge weights use the *detached* merge decision, so the merged values (and
          sizes) carry no gradient to ``θ_merge``;
        * a live A token that merges gets mask ``1 − merge``; any other live token gets
          this block's ``keep`` (prune decision, of its group's maximum importance for a
          destination); a dead token keeps the mask, and the gradient path, it had when it
          died.  "Live" is the forward value ``mask > 0`` (exactly 0 or 1);
        * prefix tokens get ``keep = 1``, a constant (the official +∞ importance).
        """
        x, p = state.x, state.num_prefix
        bsz, n, _ = x.shape
        mask = state.mask if state.mask is not None else x.new_ones(bsz, n, 1, dtype=torch.float32)
        live = mask[..., 0] > 0
        best, partner, importance = self._scores(state, signals, live)
        can_merge = torch.isfinite(best)
        merge = threshold_mask(best.masked_fill(~can_merge, -1.0), theta_m, self.params.tau) * can_merge  # B×NA
        merged = merge.detach() > 0
        size = state.sizes()
        merged_b, den = _merge_into_b(x, size, merged.unsqueeze(-1).to(size.dtype) * size[:, ::2], partner)
        imp_a = importance[:, ::2]
        imp_b = _group_max(importance[:, 1::2], partner, imp_a, merged)
        prefix = torch.arange(n, device=x.device) < p
        keep_a = self._keep_soft(imp_a, prefix[::2], theta_p)
        keep_b = self._keep_soft(imp_b, prefix[1::2], theta_p)

        new_a_mask = torch.where(live[:, ::2], torch.where(merged, 1.0 - merge, keep_a), mask[:, ::2, 0])
        new_b_mask = torch.where(live[:, 1::2], keep_b, mask[:, 1::2, 0])
        layout = self._layout(n, p, x.device)
        # assemble the full-length sequence in original positions, then re-lay out
        x_full = torch.empty_like(x)
        x_full[:, ::2] = x[:, ::2]
        x_full[:, 1::2] = merged_b
        size_full = torch.empty_like(size)
        size_full[:, ::2] = size[:, ::2]
        size_full[:, 1::2] = den
        mask_full = torch.empty_like(mask)
        mask_full[:, ::2, 0] = new_a_mask
        mask_full[:, 1::2, 0] = new_b_mask
        source = state.source  # with trace_source: what each B token stands for after its merges, as inference
        if source is not None:
            source = source.clone()
            source[:, 1::2] = _group_max(source[:, 1::2], partner, source[:, ::2], merged)
        index = layout.expand(bsz, n)
        full = dataclasses.replace(state, x=x_full, size=size_full, source=source, mask=mask_full)
        return full.redirect(_merge_targets(merged, partner, n)).gather(index)

    def _keep_soft(self, importance: Tensor, prefix: Tensor, theta_p: Tensor) -> Tensor:
        """Straight-through prune decision ``[imp > θ_prune]`` (B×M); exactly 1, gradient 0, for prefix tokens."""
        return torch.where(prefix, 1.0, threshold_mask(importance, theta_p, self.params.tau))


def _merge_targets(merge: Tensor, partner: Tensor, n: int) -> Tensor:
    """B×N positions where every token of an N-token sequence stands after the merge step: an A token
    (even position) that merges is at its B partner's (odd) position, every other token at its own."""
    b = merge.shape[0]
    own = torch.arange(n, device=merge.device).expand(b, n)
    if n < 2:
        return own
    return torch.cat([torch.where(merge, 2 * partner + 1, own[:, ::2]), own[:, 1::2]], dim=1).gather(
        1, _interleave(n, merge.device).expand(b, n))


def _interleave(n: int, device: torch.device) -> Tensor:
    """Positions that turn ``[even positions, odd positions]`` of an N-token sequence back into ``0 … N−1``."""
    pos = torch.arange(n, device=device)
    return torch.where(pos % 2 == 0, pos // 2, (n + 1) // 2 + pos // 2)


def _merge_into_b(x: Tensor, size: Tensor, w: Tensor, partner: Tensor) -> tuple[Tensor, Tensor]:
    """Weighted merge of the A tokens (even positions) into their B partners (odd positions).

    ``x_b' = (s_b·x_b + Σ_{a→b} w_a·x_a) / (s_b + Σ_{a→b} w_a)``; ``w_a`` is the A token's size
    times its hard merge decision (detached in training, as in the official code).

    Args:
        x: B×N×C tokens; size: B×N×1; w: B×NA×1 merge weights; partner: B×NA positions within B.

    Returns:
        ``(x_b', s_b')``: B×NB×C and B×NB×1 (NB = 0: empty, nothing to merge into).
    """
    num_b = x.shape[1] // 2
    if num_b == 0:
        return x[:, 1::2], size[:, 1::2]
    acc = batched_scatter_add(torch.cat([w * x[:, ::2], w], dim=-1), partner, num_b)
    den = size[:, 1::2] + acc[..., -1:]
    return (size[:, 1::2] * x[:, 1::2] + acc[..., :-1]) / den, den


def _group_max(dst: Tensor, partner: Tensor, src: Tensor, merged: Tensor) -> Tensor:
    """Each B token's value raised to the maximum over the A tokens merged into it.

    A merge destination takes the largest importance of its group (docs/methods.md#ltmp) and the
    union of its sources.  Gradients reach the maximum (``scatter_reduce`` amax).

    Args:
        dst: B×NB(×…) values of the B tokens; partner: B×NA positions within B;
        src: B×NA(×…) values of the A tokens; merged: B×NA bool merge decisions.

    Returns:
        B×NB(×…) tensor (unchanged when NB = 0).
    """
    if dst.shape[1] == 0:
        return dst
    extra = (1,) * (src.dim() - 2)
    index = partner.view(*partner.shape, *extra).expand_as(src)
    values = src.masked_fill(~merged.view(*merged.shape, *extra), -torch.inf)
    return dst.scatter_reduce(1, index, values, reduce="amax")


def ltmp_loss(
    logits: Tensor, labels: Tensor, records: list[tuple[Any, Any]], info: ModelInfo, num_tokens: int,
    target: float, reg_scale: float = 10.0, label_smoothing: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """``CE + λ·(FLOPs_ratio − target)²``; returns ``(loss, ratio)``.

    λ = ``reg_scale`` = 10 in the paper; the cross-entropy uses ``label_smoothing`` 0.1 by
    default, timm's ``--smoothing`` default that the official ``tools/train.py`` trains with.

    Args:
        logits: B×classes; labels: B class indices; records, info, num_tokens: see :func:`flops_ratio`.
    """
    ratio = flops_ratio(records, info, num_tokens).to(logits.device)
    ce = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    return ce + reg_scale * (ratio - target) ** 2, ratio


def flops_ratio(records: list[tuple[Any, Any]], info: ModelInfo, num_tokens: int) -> Tensor:
    """LTMP's differentiable FLOPs ratio from a training forward's live-token counts.

    ``(1/L) Σ_l cost(n_attn_l, n_mlp_l) / cost(N, N)`` with the batch-mean counts
    (so the quadratic term uses the squared mean count, as in the paper).

    Args:
        records: per block ``(n_attn, n_mlp)``, each a B tensor of live tokens (or an int).
        num_tokens: N, tokens entering the first block.
    """
    cost = info.cost
    terms = []
    for i, (n_a, n_m) in enumerate(records):
        n_a = n_a.float().mean() if isinstance(n_a, Tensor) else torch.tensor(float(n_a))
        n_m = n_m.float().mean() if isinstance(n_m, Tensor) else torch.tensor(float(n_m))
        full = cost.block_macs(i, num_tokens, num_tokens * num_tokens, num_tokens)
        terms.append(cost.block_macs(i, n_a, n_a * n_a, n_m) / full)
    return torch.stack(terms).mean()
