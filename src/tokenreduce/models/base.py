"""The adapter interface: what a model family provides so that every method runs on it unchanged.

A :class:`FamilyAdapter` knows one family of models (timm ``VisionTransformer``, timm ``Eva``,
Hugging Face ViTs, ...): it finds the blocks, runs a block's attention with the signals a reducer
asks for (keys, class-attention row, size bias, key masks), runs its MLP branch, and reads the model
facts (:class:`~tokenreduce.methods.base.ModelInfo`) and the cost model off the live model.
Methods never see which family they run in: they receive a :class:`~tokenreduce.state.TokenState`
and :class:`~tokenreduce.ops.attention.AttentionSignals`.

Patching follows ToMe/tomesd: the classes of the live model and of its blocks are swapped for
generated subclasses (:func:`reduced_class`) whose ``forward`` routes the tokens through
:func:`run_block`; no weight is copied and ``state_dict()`` is unchanged.  Removing the patch
restores the original classes, so the stock forward runs again, bit for bit.

Per-forward state (sizes, sources, masks, original positions, token counts) lives in one
:class:`ReductionContext` shared by the model and its blocks; block 0 resets it.  A family whose
attention depends on where a token came from (rotary position embeddings) asks for positions
(:meth:`FamilyAdapter.tracks_positions`): every token state then carries them
(:attr:`~tokenreduce.state.TokenState.pos`) through every reduction.

**Restoration** (``tr.apply(..., restore="frozen" | "fusion")``) is family-agnostic and lives here:
the token states carry the patch → token index map and the archive of pruned tokens
(:attr:`~tokenreduce.state.TokenState.owner`); with ``"fusion"`` (or a reducer that
:attr:`~tokenreduce.methods.base.Reducer.rejoins`, Cropr's ``llf``) :func:`run_block` brings the
archived tokens back before the last block; with either mode it returns the full B×N0×C grid in the
original order after the last block, so the final norm and head see the grid, and the grid entry
points (:func:`grid_entry_point`: timm's ``forward_intermediates``) return the restored grid at every
requested block while the stream itself stays reduced.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from ..ops.attention import NO_NEEDS, AttentionNeeds, AttentionSignals, KeyMask, size_bias
from ..ops.modes import tracing
from ..state import Packing, TokenState
from ..stats import LastForward
from .pickling import reduce_as_stock, reduce_reduced_model

if TYPE_CHECKING:
    from ..methods.base import ModelInfo, Reducer


class ReductionContext:
    """State shared by a reduced model and its blocks during one forward."""

    def __init__(self, reducer: Reducer, adapter: type[FamilyAdapter], method: str, trace_source: bool) -> None:
        self.reducer = reducer
        self.adapter = adapter
        self.info = reducer.info
        self.method = method
        self.trace_source = trace_source
        depth = self.info.depth
        self.needs = reducer.needs_per_block()
        self.has_before = [reducer.has_before_block(i) for i in range(depth)]
        self.has_groups = [reducer.has_groups(i) for i in range(depth)]
        self.size: Tensor | None = None
        self.source: Tensor | None = None
        self.mask: Tensor | None = None
        self.track_pos = False  # set by patch(): the family's attention needs original positions
        self.pos: Tensor | None = None
        self.pos_start: Tensor | None = None  # the positions block 0 received (unreduced, in order)
        self.scratch: dict[str, Any] = {}  # the family adapter's per-block inputs and caches (it keys them)
        self.bias: Tensor | None = None
        self._bias_of: Tensor | None = None
        self.rows: Tensor | None = None
        self._rows_of: Tensor | None = None
        self.blocks: tuple[nn.Module, ...] = ()  # set by patch(): whose hooks decide the packed stream
        self.packs = False  # this forward keeps the stream packed between blocks (start(), packed_stream())
        self.packing: Packing | None = None  # the stream is packed: x holds the live rows (ΣN×C) at these rows
        self.enabled = True  # False: the model runs its stock forward (e.g. as its own distillation teacher)
        self.restore: str | None = reducer.restore  # None, "frozen" or "fusion" (tokenreduce.apply's restore=)
        self.fusion = reducer.restore == "fusion" or reducer.rejoins  # archived tokens rejoin before the last block
        self.track_owner = reducer.restore is not None  # the grid is restored at the end: map it
        self.archives = self.fusion and not self.track_owner  # pruned tokens only rejoin: no owner map needed
        self.last_block = depth - 1
        self.owner: Tensor | None = None
        self.archive: tuple[TokenState, ...] = ()
        self.orphans = False
        self.capture: frozenset[int] = frozenset()  # blocks whose restored output a grid entry point asked for
        self.captures = 0  # grid captures served (a delegating entry point checks its call was one)
        self.stash: tuple[Tensor, Tensor] | None = None  # (restored grid returned, reduced stream behind it)
        self.final: tuple[Tensor | None, ...] | None = None  # (size, source, mask, pos) before the final restore
        self.num_tokens_in = 0
        self.batch_size = 0
        self.records: list[tuple[Any, Any] | None] = [None] * depth
        self.stages: list[tuple[str, Tensor]] = []

    def start(self, x: Tensor, training: bool) -> None:
        """Reset for a new forward whose first block receives ``x`` (B×N×C)."""
        b, n, _ = x.shape
        self.reducer.training = training
        if self.reducer.needs_vary:
            self.needs = self.reducer.needs_per_block()
        module = self.reducer.module
        if module is not None:  # learned parameters follow the activations (the model may have moved)
            first = next(module.parameters(), None)
            if first is not None and first.device != x.device:
                module.to(x.device)
        self.size = self.mask = None
        self.bias = self._bias_of = None
        self.rows = self._rows_of = None
        self.packing = None
        self.packs = self.packed_stream(training)
        self.source = None
        self.pos = self.pos_start = None
        self.owner, self.archive, self.orphans = None, (), False
        self.stash = self.final = None
        if self.track_owner:
            self.owner = torch.arange(n, device=x.device).expand(b, n)
        if self.track_pos:
            self.pos = self.pos_start = torch.arange(n, device=x.device).view(1, n, 1).expand(b, n, 1)
        if self.trace_source:
            self.source = torch.eye(n, device=x.device, dtype=x.dtype).expand(b, n, n)
        self.num_tokens_in = n
        self.batch_size = b
        self.records = [None] * self.info.depth
        self.stages = []  # with trace_source: (label, B×N×N0 sources) per reduction

    def packed_stream(self, training: bool) -> bool:
        """Whether this forward keeps the stream packed between blocks (``Reducer.packs_stream``): inference
        without autograd or tracing, and nothing that reads the padded stream between blocks (source
        tracing, restoration, last-layer fusion, a grid entry point's captures, forward hooks on the blocks,
        which see the blocks' B×N×C outputs)."""
        if not self.reducer.packs_stream or training or torch.is_grad_enabled() or tracing():
            return False
        if self.trace_source or self.track_owner or self.fusion or self.capture:
            return False
        if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
            return False
        return not any(blk._forward_hooks or blk._forward_pre_hooks for blk in self.blocks)

    def key_bias(self) -> Tensor | None:
        """``log size`` for proportional attention, recomputed only when sizes change."""
        if not self.reducer.prop_attn or self.size is None:
            return None
        if self._bias_of is not self.size:
            self.bias, self._bias_of = size_bias(self.size), self.size
        return self.bias

    def key_mask(self) -> KeyMask | None:
        """How the carried live-token mask enters attention (the reducer decides), or ``None``."""
        return None if self.mask is None else self.reducer.key_mask(self.mask)

    def packed_rows(self, training: bool) -> Tensor | None:
        """For padded batched inference (a hard mask, eval mode): the rows of the live tokens
        in the B·N flattening of the current mask (ΣN), cached per mask; else ``None``.

        Finding them syncs with the host once per new mask (their number is data-dependent); a packed
        stream brings them along.
        """
        if self.packing is not None:
            return self.packing.rows
        if self.mask is None or training or self.reducer.key_mask(self.mask).soft:
            return None
        if self._rows_of is not self.mask:
            self.rows, self._rows_of = self.mask.reshape(-1).nonzero().squeeze(1), self.mask
        return self.rows

    def snapshot(self, label: str) -> None:
        """Keep the live tokens' sources after a reduction (for token maps)."""
        source = self.source if self.mask is None else self.source * self.mask.to(self.source.dtype)
        self.stages.append((label, source))

    def state(self, x: Tensor) -> TokenState:
        return TokenState(x, self.size, self.source, self.info.num_prefix, self.mask, self.pos, self.owner,
                          self.archive, self.orphans, self.archives, self.packing)

    def update(self, state: TokenState) -> Tensor:
        if self.track_pos and state.pos is None:
            raise RuntimeError(
                f"tokenreduce: {self.method} returned tokens without their original positions, which this model's "
                f"attention needs (rotary position embeddings); a reduction must carry TokenState.pos along"
            )
        if self.track_owner and state.owner is None:
            raise RuntimeError(
                f"tokenreduce: {self.method} returned tokens without their owner map, which restoration needs; "
                f"a reduction must carry TokenState.owner along (TokenState.gather / append / the ops in ops/ do)"
            )
        if self.packs and state.packing is None and state.mask is not None:
            state = state.packed()  # the first masked reduction of a packed forward (or the Python path's)
        self.size, self.source, self.mask, self.pos = state.size, state.source, state.mask, state.pos
        self.owner, self.archive, self.orphans = state.owner, state.archive, state.orphans
        self.packing = state.packing
        if state.size_bias is not None:  # the reduction computed the bias; key_bias uses it while size is its size
            self._bias_of, self.bias = state.size_bias
        return state.x

    def unpack(self, x: Tensor) -> Tensor:
        """The padded B×N×C stream (padding rows zero) of a packed one; ``x`` as it is otherwise."""
        if self.packing is None:
            return x
        x = self.state(x).unpacked().x
        self.packing = None
        return x

    # -- restoration ---------------------------------------------------------------------------------
    def rejoin(self, x: Tensor) -> Tensor:
        """Last-layer fusion: the archived (pruned) tokens rejoin the current ones (:meth:`TokenState.rejoin`)."""
        return self.update(self.state(x).rejoin())

    def finish(self, x: Tensor) -> Tensor:
        """After the last block: the restored B×N0×C grid (original order, prefix first).  From here on the
        tokens are the unreduced grid (sizes, masks and positions reset for the pool and head); the reduced
        tokens' record stays for :meth:`last_forward`."""
        grid = self.state(x).restore()
        self.final = (self.size, self.source, self.mask, self.pos)
        self.size = self.source = self.mask = None
        self.pos, self.owner, self.archive, self.orphans = self.pos_start, None, (), False
        return grid

    @contextmanager
    def capturing(self, blocks: frozenset[int]) -> Iterator[None]:
        """While inside: the blocks in ``blocks`` return their restored grid (B×N0×C, :meth:`capture_grid`)
        and the next block carries on with the reduced stream (:meth:`resume`)."""
        self.captures += 1
        previous, self.capture, self.stash = self.capture, blocks, None
        try:
            yield
        finally:
            self.capture, self.stash = previous, None

    def capture_grid(self, x: Tensor) -> Tensor:
        """A grid entry point asked for this block's output: return it restored (B×N0×C) and keep the
        reduced stream ``x`` (B×N×C) for the next block (:meth:`resume`)."""
        grid = self.state(x).restore()
        self.stash = (grid, x)
        return grid

    def resume(self, x: Tensor) -> Tensor:
        """The reduced stream behind the restored grid the previous block returned.

        Raises:
            RuntimeError: the next block received something else than that grid (a caller that changes
                the tokens between blocks: its result could not be served on a reduced model).
        """
        grid, stream = self.stash
        self.stash = None
        if x is not grid:
            raise RuntimeError(
                "tokenreduce: a block of the reduced model received other tokens than the restored grid the "
                "previous block returned; the grid entry point cannot be served with restoration on this caller"
            )
        return stream

    def count(self, x: Tensor) -> int | Tensor:
        """Live tokens per image: an int, or a B tensor when a mask is carried."""
        return x.shape[1] if self.mask is None else self.mask.sum(dim=(1, 2))

    def last_forward(self) -> LastForward:
        """The record of the last reduced forward.

        Raises:
            RuntimeError: no reduced forward has run since the method was applied.
        """
        if self.records[0] is None or any(r is None for r in self.records):
            raise RuntimeError("the reduced model has not run a forward yet (call model(images) first)")
        size, source, mask, pos = self.final if self.final is not None else (self.size, self.source, self.mask,
                                                                              self.pos)
        return LastForward(
            method=self.method,
            batch_size=self.batch_size,
            num_tokens_in=self.num_tokens_in,
            num_prefix=self.info.num_prefix,
            block_tokens=tuple(self.records),
            size=size,
            source=source,
            mask=mask,
            stages=tuple(self.stages),
            pos=pos,
        )


class FamilyAdapter:
    """One model family.  Subclasses set :attr:`name` and :attr:`description` and implement the
    class methods below; adding a family is adding one such module under ``models/``.

    Block-level hooks (called by :func:`run_block` on a patched block):

    * :meth:`attention` — the block's pre-norm and attention on B×N×C tokens (or ΣN×C live rows
      when ``packed``), with the reducer's key bias and mask; returns the branch output before the
      residual scaling, and the signals;
    * :meth:`attention_residual` — layer scale and drop path of the attention branch;
    * :meth:`mlp` — the whole MLP branch (norm, MLP, layer scale, drop path) on B×N×C or ΣN×C.
    """

    name: ClassVar[str] = ""
    """Short family name, recorded in checkpoints' model fingerprints (``"timm-vit"``)."""
    description: ClassVar[str] = ""
    """What the family covers, for the error that lists supported families."""
    model_members: ClassVar[dict[str, Any]] = {}
    """Members of the generated model class (size-aware pooling, refusals, ``_apply``)."""
    @classmethod
    def data_config(cls, model: nn.Module, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """How to read images for ``model``, as timm's data config (input size, interpolation, mean / std,
        crop): timm's ``resolve_data_config`` for timm models."""
        import timm.data

        return timm.data.resolve_data_config(overrides or {}, model=model)

    # -- the model ---------------------------------------------------------------------------------
    @classmethod
    def grid_reason(cls, model: nn.Module) -> str | None:
        """Why ``model``'s own forward needs the full token grid after every block (then it can only be
        reduced with restoration, ``tokenreduce.apply(..., restore=...)``), or ``None``: it does not."""
        return None

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether ``model`` belongs to this family (its class, not its configuration)."""
        raise NotImplementedError

    @classmethod
    def check_supported(cls, model: nn.Module) -> None:
        """Raise ``TypeError`` if this family's ``model`` has a configuration the adapter cannot run."""

    @classmethod
    def tracks_positions(cls, model: nn.Module) -> bool:
        """Whether the blocks' attention needs every token's original position (rotary embeddings):
        then the token states carry :attr:`~tokenreduce.state.TokenState.pos`.  ``False`` by default."""
        return False

    @classmethod
    def patched_modules(cls, model: nn.Module) -> Sequence[tuple[nn.Module, dict[str, Any]]]:
        """Modules besides the model and its blocks whose class the patch swaps, each with the members of
        its generated class: heads outside the model's own methods that must see the reduced tokens' sizes
        and masks (an HF attention-pool head).  They get the context as ``_tr_ctx``.  None by default."""
        return ()

    @classmethod
    def blocks(cls, model: nn.Module) -> Sequence[nn.Module]:
        """The transformer blocks, in order."""
        raise NotImplementedError

    @classmethod
    def model_info(cls, model: nn.Module) -> ModelInfo:
        """The facts a reducer may use about ``model``, with its cost model."""
        raise NotImplementedError

    @classmethod
    def input_size(cls, model: nn.Module) -> tuple[int, int, int]:
        """(channels, height, width) of the images the model takes at its configured size."""
        raise NotImplementedError

    @classmethod
    def patch_size(cls, model: nn.Module) -> tuple[int, int]:
        """(height, width) of one patch in pixels."""
        raise NotImplementedError

    @classmethod
    def final_tokens_module(cls, model: nn.Module) -> nn.Module:
        """The module whose output is the model's final B×N×C tokens (its final norm where the family has
        one on the tokens; by default the last block), e.g. for DynamicViT's token distillation."""
        return cls.blocks(model)[-1]

    @classmethod
    def block_forward(cls) -> Callable[..., Any]:
        """The ``forward`` of a patched block: parses the family's block signature (refusing
        arguments a reduced block cannot honour), calls :func:`run_block` and returns what the
        family's block returns."""
        raise NotImplementedError

    # -- one block ---------------------------------------------------------------------------------
    @classmethod
    def attention(
        cls, block: nn.Module, x: Tensor, bias: Tensor | None, needs: AttentionNeeds, key_mask: KeyMask | None,
        packed: Tensor | None, class_token: bool,
    ) -> tuple[Tensor, AttentionSignals]:
        raise NotImplementedError

    @classmethod
    def attention_residual(cls, block: nn.Module, out: Tensor) -> Tensor:
        raise NotImplementedError

    @classmethod
    def mlp(cls, block: nn.Module, x: Tensor) -> Tensor:
        raise NotImplementedError


def run_block(block: nn.Module, x: Tensor, stock: Callable[[Tensor], Tensor]) -> Tensor:
    """One patched block on B×N×C tokens: the reducer's hooks around the family's attention and MLP.

    Order: the reducer's between-block reduction, attention (with the size bias and key mask), the
    in-block reduction after the attention residual, the MLP (:func:`branches`); or, where the reducer
    groups tokens for the branches (ToMe for SD), attention and MLP on the group means, unmerged into
    the full stream (:func:`grouped_branches`).  ``stock`` runs the stock block on
    B×N×C tokens: used for an empty batch (B = 0), so a reduced model returns the stock model's
    empty outputs, and while reduction is paused (:func:`tokenreduce.unreduced`).

    Restoration: before the last block, with last-layer fusion, the archived tokens rejoin (after the
    between-block reduction); after the last block, with ``restore`` set, the block returns the
    restored B×N0×C grid; after a block a grid entry point captures, it returns that block's restored
    grid and the next block picks the reduced stream back up.
    """
    ctx: ReductionContext = block._tr_ctx
    if not ctx.enabled:
        return stock(x)
    i: int = block._tr_index
    if i == 0:
        ctx.start(x, block.training)
    elif ctx.stash is not None:
        x = ctx.resume(x)
    if ctx.batch_size == 0:  # nothing to reduce; the stock block keeps the stock output shapes
        ctx.records[i] = (x.shape[1], x.shape[1])
        return stock(x)
    reducer = ctx.reducer
    changed = False
    if ctx.has_before[i]:
        x, changed = ctx.update(reducer.before_block(i, ctx.state(x))), True
    if ctx.fusion and i == ctx.last_block and ctx.archive:
        x, changed = ctx.rejoin(x), True
    if changed and ctx.trace_source:
        ctx.snapshot(f"before block {i}")
    if ctx.has_groups[i]:
        x = grouped_branches(ctx, block, i, x)
    else:
        x = branches(ctx, block, i, x)
    if i == ctx.last_block:  # the norm and the pool read the padded stream
        x = ctx.unpack(x)
        reducer.end_forward()
    if ctx.restore is not None and i == ctx.last_block:
        return ctx.finish(x)
    if i in ctx.capture:
        return ctx.capture_grid(x)
    return x


def branches(ctx: ReductionContext, block: nn.Module, i: int, x: Tensor) -> Tensor:
    """Block ``i``'s attention, the reducer's in-block reduction and the MLP on B×N×C tokens (or on the
    live rows of a padded batch)."""
    adapter, reducer = ctx.adapter, ctx.reducer
    n_attn = ctx.count(x)
    needs = ctx.needs[i]
    key_mask = ctx.key_mask()
    class_token = ctx.info.has_class_token
    rows = ctx.packed_rows(block.training)
    if rows is None or ctx.packing is not None:  # x: B×N×C, or the packed stream's live rows (ΣN×C)
        out, signals = adapter.attention(block, x, ctx.key_bias(), needs or NO_NEEDS, key_mask, rows, class_token)
        x = x + adapter.attention_residual(block, out)
    else:  # padded batched inference: per-token work on the live tokens only
        live = x.reshape(-1, x.shape[-1]).index_select(0, rows)
        out, signals = adapter.attention(block, live, ctx.key_bias(), needs or NO_NEEDS, key_mask, rows, class_token)
        x = add_to_rows(x, rows, adapter.attention_residual(block, out))
    del out  # free the attention output before the MLP, as the stock block does
    if needs is not None:
        x = ctx.update(reducer.reduce(i, ctx.state(x), signals))
        if ctx.trace_source:
            ctx.snapshot(f"block {i}")
    del signals  # keys / values / probabilities are not needed by the MLP
    ctx.records[i] = (n_attn, ctx.count(x))
    if ctx.packing is not None:  # the packed stream (ΣN×C): x was made in this block, nothing else holds it
        return x.add_(adapter.mlp(block, x))
    rows = ctx.packed_rows(block.training)
    if rows is not None:
        # The MLP is per-token: run it on the live tokens of all images packed into
        # one ΣN×C matrix, so padding rows cost nothing; they keep their values.
        live = x.reshape(-1, x.shape[-1]).index_select(0, rows)
        # x was made in this block (by the attention residual or the reduction): without autograd the
        # MLP residual can go into it in place, saving a copy of the padded B×N×C stream
        x = add_to_rows(x, rows, adapter.mlp(block, live), in_place=not (x.requires_grad or tracing()))
    else:
        x = x + adapter.mlp(block, x)
    return x


def grouped_branches(ctx: ReductionContext, block: nn.Module, i: int, x: Tensor) -> Tensor:
    """Block ``i`` with merged branches (ToMe for SD, :mod:`tokenreduce.ops.unmerge`): the reducer groups
    the B×N×C stream's tokens; attention and MLP each run on the B×M×C group means (proportional
    attention from the group sizes when the reducer uses it; group positions are their representatives')
    and their outputs are copied back to every token of the group before the residual add.  The stream
    keeps all N tokens.

    Every token of a group receives the same attention output ``a``, so the group means before the MLP
    are the earlier means plus ``a``: the block merges once and unmerges once (``a`` plus the MLP output).
    """
    if ctx.mask is not None or ctx.size is not None:
        raise RuntimeError("tokenreduce: merged branches need a stream of unit-size live tokens (no sizes or masks)")
    adapter, reducer = ctx.adapter, ctx.reducer
    groups = reducer.groups(i, ctx.state(x))
    bias = size_bias(groups.size) if reducer.prop_attn else None
    merged = groups.merge(x)
    stream_pos = ctx.pos
    if stream_pos is not None:  # rotary families read ctx.pos: the merged tokens sit at their representatives'
        ctx.pos = stream_pos.gather(1, groups.rep.unsqueeze(-1))
    try:
        out, _ = adapter.attention(block, merged, bias, NO_NEEDS, None, None, ctx.info.has_class_token)
    finally:
        ctx.pos = stream_pos
    update = adapter.attention_residual(block, out)
    del out
    update = update + adapter.mlp(block, merged + update)
    x = groups.unmerge_add(x, update)
    m = groups.num_merged
    ctx.records[i] = (m, m)  # what the branches saw (the GMACs); the stream keeps its N tokens
    if ctx.trace_source:  # token maps: the groups the branches saw (B×M×N0)
        members = torch.nn.functional.one_hot(groups.slot, m).to(ctx.source.dtype).transpose(1, 2)
        ctx.stages.append((f"block {i} branches", members @ ctx.source))
    return x


def add_to_rows(x: Tensor, rows: Tensor, update: Tensor, in_place: bool = False) -> Tensor:
    """``x`` (B×N×C) plus ``update`` (ΣN×C) on the flattened ``rows``; other rows unchanged.

    ``in_place``: add into ``x`` itself (only for a contiguous tensor nothing else holds)."""
    flat = x.reshape(-1, x.shape[-1])
    if in_place and x.is_contiguous():
        return flat.index_add_(0, rows, update.to(flat.dtype)).view_as(x)
    return flat.index_add(0, rows, update.to(flat.dtype)).view_as(x)


# -- patching -----------------------------------------------------------------------------------------

_CLASS_CACHE: dict[tuple[type, str], type] = {}
"""Generated subclasses, one per (stock class, kind); bounded by the number of model and block classes used."""


def reduced_class(base: type, kind: str, members: dict[str, Any]) -> type:
    """The generated subclass of ``base`` with ``members`` (cached per ``(base, kind)``).

    It pickles as ``base`` (:mod:`.pickling`) unless ``members`` give another ``__reduce_ex__``."""
    key = (base, kind)
    if key not in _CLASS_CACHE:
        members = {"__reduce_ex__": reduce_as_stock, **members, "_tr_base": base}
        _CLASS_CACHE[key] = type(f"TokenReduce{base.__name__}", (base,), members)
    return _CLASS_CACHE[key]


def is_patched(model: nn.Module) -> bool:
    """Whether a method is applied to ``model``."""
    return isinstance(getattr(model, "_tr_ctx", None), ReductionContext)


def context_of(model: nn.Module) -> ReductionContext:
    """The reduction context of a patched model.

    Raises:
        RuntimeError: no method is applied to ``model``.
    """
    ctx = getattr(model, "_tr_ctx", None)
    if not isinstance(ctx, ReductionContext):
        raise RuntimeError("the model has no method applied (call tokenreduce.apply first)")
    return ctx


def model_apply(self: nn.Module, fn: Any, recurse: bool = True) -> nn.Module:
    """``nn.Module._apply`` (what ``.to()``, ``.half()``, ``.cuda()``, ``.float()``, ... run) that also
    applies ``fn`` to the reducer's learned parameters, so they follow the model's dtype and device as
    a registered submodule's would, without being one (``state_dict()`` and ``parameters()`` stay stock)."""
    self._tr_base._apply(self, fn, recurse)
    module = self._tr_ctx.reducer.module
    if module is not None:
        module._apply(fn, recurse)
    return self


def patch(model: nn.Module, adapter: type[FamilyAdapter], reducer: Reducer, method: str,
          trace_source: bool = False) -> None:
    """Route ``model``'s blocks through ``reducer`` (in place), the family's way."""
    ctx = ReductionContext(reducer, adapter, method, trace_source)
    ctx.track_pos = adapter.tracks_positions(model)
    ctx.blocks = tuple(adapter.blocks(model))
    members = {"_apply": model_apply, "__reduce_ex__": reduce_reduced_model, **adapter.model_members}
    model.__class__ = reduced_class(type(model), f"{adapter.name}:model", members)
    model._tr_ctx = ctx
    forward = adapter.block_forward()
    for i, blk in enumerate(adapter.blocks(model)):
        blk.__class__ = reduced_class(type(blk), f"{adapter.name}:block", {"forward": forward})
        blk._tr_ctx = ctx
        blk._tr_index = i
    for module, members in adapter.patched_modules(model):
        module.__class__ = reduced_class(type(module), f"{adapter.name}:{type(module).__name__}", members)
        module._tr_ctx = ctx


def unpatch(model: nn.Module) -> None:
    """Undo :func:`patch`; a no-op on an unpatched model."""
    if not is_patched(model):
        return
    for blk in model._tr_ctx.adapter.blocks(model):
        if hasattr(blk, "_tr_base"):
            blk.__class__ = blk._tr_base
        for attr in ("_tr_ctx", "_tr_index"):
            blk.__dict__.pop(attr, None)
    for module, _ in model._tr_ctx.adapter.patched_modules(model):
        if hasattr(module, "_tr_base"):
            module.__class__ = module._tr_base
        module.__dict__.pop("_tr_ctx", None)
    model.__class__ = model._tr_base
    model.__dict__.pop("_tr_ctx", None)


CaptureBlocks = Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], Sequence[int]]
"""``(model, args, kwargs) -> block indices``: the blocks whose outputs a grid entry point's call returns."""


def grid_entry_point(name: str, capture: CaptureBlocks | None = None) -> Callable[..., Any]:
    """A stand-in for a model method that returns tokens in the patch grid (timm's ``forward_intermediates``).

    Without restoration the surviving tokens no longer fill that grid, so the stand-in refuses, saying to
    apply the method with ``restore=``.  With restoration it runs the stock method while the blocks
    ``capture(model, args, kwargs)`` names return their restored grid (B×N0×C), so every intermediate the
    stock method collects is grid-shaped while the stream stays reduced.  Without ``capture`` the stock
    method must delegate to another grid entry point that captures (``get_intermediate_layers`` calls
    ``forward_intermediates``); if it does not, it refuses instead of returning reduced tokens.  Inside
    :func:`tokenreduce.unreduced`, and for a reducer whose stream keeps the grid (``Reducer.keeps_grid``),
    the stock method runs.
    """

    def entry(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        ctx: ReductionContext = self._tr_ctx
        stock = getattr(self._tr_base, name)
        if not ctx.enabled or ctx.restore is None and ctx.reducer.keeps_grid:  # the stream is the grid
            return stock(self, *args, **kwargs)
        if ctx.restore is None:
            raise NotImplementedError(
                f"{name} on a reduced model: the reduced tokens no longer fill the patch grid it returns; apply the "
                f"method with restore='frozen' (or 'fusion') to get the full grid back (tokenreduce.apply(model, "
                f"method, restore='frozen')), run it on the stock model (tokenreduce.remove, or inside "
                f"tokenreduce.unreduced(model)), or use forward_features for the reduced tokens (B×N'×C)"
            )
        if capture is None:
            served = ctx.captures
            out = stock(self, *args, **kwargs)
            if ctx.captures == served:
                raise NotImplementedError(
                    f"{name} on a reduced model with restoration: this model's {name} does not go through a grid "
                    f"entry point tokenreduce can restore, so its result would hold reduced tokens"
                )
            return out
        with ctx.capturing(frozenset(int(i) for i in capture(self, args, kwargs))):
            return stock(self, *args, **kwargs)

    entry.__name__ = name
    return entry


def shape_change(name: str) -> Callable[..., Any]:
    """A stand-in for a model method that changes what the applied reducer was built for."""

    def refuse(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            f"{name} on a reduced model would leave the applied method configured for the old model; "
            f"call tokenreduce.remove(model), then {name}, then tokenreduce.apply again"
        )

    refuse.__name__ = name
    return refuse
