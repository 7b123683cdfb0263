"""What every Hugging Face ``transformers`` family adapter shares (``pip install "tokenreduce[hf]"``).

The families themselves are in :mod:`~tokenreduce.models.hf_vit` (ViT, DeiT, DINOv2) and
:mod:`~tokenreduce.models.hf_clip` (CLIP and SigLIP vision towers).  They need transformers >=
:data:`MIN_TRANSFORMERS`, the releases in which every one of these families computes attention
with separate ``q_proj`` / ``k_proj`` / ``v_proj`` projections and an ``attention_interface``.

**Detection without importing transformers.**  An adapter recognises a model by the module its
class comes from (``type(model).__module__`` starting with ``transformers.models.<family>.``) and
the class name, so :func:`tokenreduce.models.adapter_for` never imports transformers for a timm
model.  transformers is imported when an HF model is adapted; if it is missing (or too old) the
error says to install the extra.

**What runs.**  Every encoder layer's class is swapped for a generated subclass (no weight is
copied, ``state_dict()`` is unchanged, :func:`tokenreduce.remove` restores the stock classes, so
the stock forward runs again bit for bit).  The layer's attention is computed from the layer's own
``q_proj`` / ``k_proj`` / ``v_proj`` / output projection by the family-agnostic
:func:`~tokenreduce.ops.attention.attend`: with the model's ``config._attn_implementation``
``"sdpa"`` it stays on the fused ``scaled_dot_product_attention`` kernel (the size bias and key
masks enter as its additive float ``attn_mask``), with ``"eager"`` it is the explicit softmax.
Other implementations (``"flash_attention_2"``, ``"flex_attention"``, ...) are refused: they take
no additive bias.  The model's class is swapped too: its ``forward`` refuses what a reduced model
cannot honour and, for heads that average the tokens, weights them by size (see the families).

**The model's own outputs on a reduced model.**

* ``last_hidden_state``: the tokens leaving the last layer (after the final norm), B×N'×C with N'
  the reduced count; the prefix tokens (class, distillation) keep their positions, the others are
  in the reducer's order, no longer the patch grid.  With per-image token counts (threshold methods
  in batched inference, training forms of learned methods) some rows are padding:
  ``tokenreduce.last_forward(model).mask`` (B×N'×1) marks the live ones, and ``.size`` how many
  patches each token stands for.
* ``pooler_output`` / ``logits`` / ``image_embeds``: computed from the reduced tokens as the stock
  model computes them from all tokens; poolers that average tokens weight them by size and mask.
* ``hidden_states`` (``output_hidden_states=True``): entry 0 is the embedding output (all tokens),
  entry ``i + 1`` the tokens leaving layer ``i`` after that layer's reductions, so their lengths
  shrink (and may carry padding rows, as above; the masks of intermediate layers are not kept).
  With restoration (``tokenreduce.apply(..., restore="frozen" | "fusion")``) every entry is the
  full grid instead, B×N0×C in the original order: each layer's output restored as the last one's
  is (merged tokens copied to their patches, pruned ones as they were when pruned), while the
  layers themselves still run on the reduced tokens.
* ``attentions`` (``output_attentions=True``), ``head_mask`` and ``attention_mask`` are refused
  with an error: the fused kernel computes no attention probabilities, and a mask over the original
  tokens no longer lines up with the reduced ones.
* ``interpolate_pos_encoding=True`` works: the reducer takes the token count of every forward
  from the tokens that reach the first layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..budget import CostModel, linear_macs
from ..methods.base import ModelInfo
from ..ops.attention import (
    AttentionNeeds,
    AttentionSignals,
    KeyMask,
    attend,
    attend_ragged,
    merge_heads,
    pack_rows,
    ragged_applies,
    unpack_rows,
)
from .base import FamilyAdapter, ReductionContext, run_block

MIN_TRANSFORMERS = "5.18"
"""The oldest transformers release the HF adapters support (tested: 5.18.0 and 5.24.0)."""

INSTALL_HINT = 'pip install "tokenreduce[hf]"'

SUPPORTED_ATTENTION = ("sdpa", "eager")
"""``config._attn_implementation`` values a reduced HF model runs with."""


class MissingExtraError(ImportError):
    """An optional dependency a model needs is not installed (the message says which extra to install)."""


def stock_class(model: nn.Module) -> type:
    """The model's class before any patch (a patched model's generated class names its base)."""
    return getattr(model, "_tr_base", type(model))


def is_hf_model(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face transformers model (by its class's module; imports nothing)."""
    return stock_class(model).__module__.startswith("transformers.")


def require_transformers() -> Any:
    """The ``transformers`` module, at least :data:`MIN_TRANSFORMERS`.

    Raises:
        MissingExtraError: transformers is not installed, or too old.
    """
    try:
        import transformers
    except ImportError as err:
        raise MissingExtraError(
            f"this is a Hugging Face transformers model, and tokenreduce needs transformers >= {MIN_TRANSFORMERS} "
            f"to reduce it: {INSTALL_HINT}"
        ) from err
    if _version(transformers.__version__) < _version(MIN_TRANSFORMERS):
        raise MissingExtraError(
            f"tokenreduce needs transformers >= {MIN_TRANSFORMERS} for Hugging Face models (installed: "
            f"{transformers.__version__}; older releases lay the attention out differently): {INSTALL_HINT} "
            f"--upgrade"
        )
    return transformers


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit()) if not piece.isdigit() else piece
        if not digits:
            break
        parts.append(int(digits))
        if not piece.isdigit():
            break
    return tuple(parts)


def submodule(model: nn.Module, path: str) -> nn.Module:
    """``model`` followed along a dotted attribute path (``""``: the model itself)."""
    for name in filter(None, path.split(".")):
        model = getattr(model, name)
    return model


def conv_macs(conv: nn.Module) -> int:
    """MACs per output position of a patch-embedding ``nn.Conv2d`` (per patch)."""
    return conv.out_channels * (conv.in_channels // conv.groups) * conv.kernel_size[0] * conv.kernel_size[1]


def attention_implementation(attn: nn.Module) -> str:
    """The attention implementation the module's config selects (``"sdpa"``, ``"eager"``, ...)."""
    return str(getattr(attn.config, "_attn_implementation", None) or "eager")


def check_attention_implementation(name: str) -> None:
    """Refuse an attention implementation that takes no additive bias.

    Raises:
        ValueError: not ``"sdpa"`` or ``"eager"``.
    """
    if name not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"tokenreduce cannot reduce a model whose attention implementation is {name!r}: reduction adds the "
            f"tokens' sizes (proportional attention) and masks as an additive bias, which {name} does not take; "
            "load the model with attn_implementation='sdpa' (fused, the default) or 'eager', or call "
            "model.set_attn_implementation('sdpa')"
        )


# -- forwards of the generated classes ---------------------------------------------------------------


def _block_forward(self: nn.Module, hidden_states: Tensor, attention_mask: Tensor | None = None,
                   *args: Any, **kwargs: Any) -> Tensor:
    """An HF encoder layer's ``forward(hidden_states, attention_mask, **kwargs)`` with the reducer's hooks."""
    ctx: ReductionContext = self._tr_ctx
    if ctx.enabled:
        if attention_mask is not None or args:
            raise NotImplementedError(
                "tokenreduce: an attention_mask on a reduced Hugging Face model is not supported (it masks the "
                "original tokens, which no longer line up with the reduced ones); run without it"
            )
        if kwargs.get("head_mask") is not None:
            raise NotImplementedError("tokenreduce: head_mask is not supported on a reduced model")
        if getattr(self, "gradient_checkpointing", False) and self.training and torch.is_grad_enabled():
            raise RuntimeError(_CHECKPOINTING_MESSAGE)
    return run_block(self, hidden_states, lambda x: self._tr_base.forward(self, x, attention_mask, *args, **kwargs))


_CHECKPOINTING_MESSAGE = (
    "tokenreduce cannot reduce a model with gradient checkpointing on (the recomputed layers would see the token "
    "bookkeeping of the end of the forward); call model.gradient_checkpointing_disable() first"
)


def _wants(model: nn.Module, kwargs: Mapping[str, Any], name: str) -> bool:
    """Whether the call (or, by default, the model's config) asks for an ``output_*`` flag."""
    value = kwargs.get(name)
    if value is None:
        value = getattr(getattr(model, "config", None), name, False)
    return bool(value) if not isinstance(value, (list, tuple)) else len(value) > 0


def _model_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The reduced model's ``forward``: refuses what it cannot honour, then the family's forward."""
    ctx: ReductionContext = self._tr_ctx
    if _wants(self, kwargs, "output_hidden_states"):
        _follow_recordable_outputs(type(self))
    if not ctx.enabled:
        return self._tr_base.forward(self, *args, **kwargs)
    adapter = ctx.adapter
    check_attention_implementation(attention_implementation(getattr(adapter.blocks(self)[0], adapter.attn_name)))
    if _wants(self, kwargs, "output_attentions"):
        raise NotImplementedError(
            "tokenreduce: output_attentions=True on a reduced model is not supported (the fused attention "
            "computes no probabilities, and they would not cover the original tokens); run "
            "the stock model (tokenreduce.remove, or inside tokenreduce.unreduced(model)) to read them"
        )
    if kwargs.get("head_mask") is not None:
        raise NotImplementedError("tokenreduce: head_mask is not supported on a reduced model")
    forward = adapter.reduced_forward(self._tr_base)
    if forward is None:
        forward = self._tr_base.forward
    if ctx.restore is not None and (_wants(self, kwargs, "output_hidden_states")
                                    or type(self)._tr_base.__name__ in adapter.grid_classes):
        # every layer's recorded output is its restored grid; the last one's is restored anyway
        with ctx.capturing(frozenset(range(ctx.last_block))):
            return forward(self, *args, **kwargs)
    return forward(self, *args, **kwargs)


def _follow_recordable_outputs(cls: type) -> None:
    """Let HF's output recording (``hidden_states``) find a generated model class.

    transformers looks up the outputs a model can record by the name of the model's class
    (``str(type(model))``, in ``transformers.utils.output_capturing._CAN_RECORD_REGISTRY``, filled
    at construction), so after the patch swaps the class it would find nothing and silently return
    no hidden states.  The generated class gets its stock class's entry.
    """
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY as registry
    except ImportError:  # other releases read the class attribute, which the subclass inherits
        return
    key, stock = str(cls), str(cls._tr_base)
    if not dict.__contains__(registry, key) and dict.__contains__(registry, stock):
        dict.__setitem__(registry, key, dict.__getitem__(registry, stock))


def _refuse_checkpointing(self: nn.Module, *args: Any, **kwargs: Any) -> None:
    raise RuntimeError(
        "gradient checkpointing on a reduced model would re-run the layers with the token bookkeeping of the end "
        "of the forward; call tokenreduce.remove(model) first (and tokenreduce.apply again after, with it off)"
    )


def token_mean(ctx: ReductionContext, tokens: Tensor, skip: int) -> Tensor:
    """The mean of ``tokens`` (B×N×C) after the first ``skip``, B×C: weighted by how many patches each
    token stands for and by its live mask on a reduced forward; the plain mean otherwise."""
    if not ctx.enabled or ctx.size is None and ctx.mask is None:
        return tokens[:, skip:].mean(dim=1)
    weights = ctx.state(tokens).sizes()[:, skip:]
    if ctx.mask is not None:
        weights = weights * ctx.mask[:, skip:]
    weights = weights.to(tokens.dtype)
    return (tokens[:, skip:] * weights).sum(dim=1) / weights.sum(dim=1)


def classifier_output(self: nn.Module, logits: Tensor, labels: Tensor | None, outputs: Any, return_dict: bool | None,
                      **kwargs: Any) -> Any:
    """``ImageClassifierOutput`` (a tuple with ``return_dict=False``) as the stock classifiers return it."""
    from transformers.modeling_outputs import ImageClassifierOutput

    loss = self.loss_function(labels, logits, self.config, **kwargs) if labels is not None else None
    out = ImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                attentions=outputs.attentions)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    return out if return_dict else out.to_tuple()


# -- the shared adapter --------------------------------------------------------------------------------


class HFAdapter(FamilyAdapter):
    """A Hugging Face encoder family: pre-norm layers ``norm1 → attention → residual → norm2 → mlp →
    residual`` with ``q_proj`` / ``k_proj`` / ``v_proj`` and an output projection.

    A family sets the class attributes below and overrides :meth:`attention_residual`,
    :meth:`mlp`, :meth:`head_modules` where its layers differ.
    """

    module_prefix: ClassVar[str] = ""
    """``type(model).__module__`` prefix of the family (``"transformers.models.vit."``)."""
    classes: ClassVar[dict[str, str]] = {}
    """Supported model class names → attribute path from the model to its backbone (embeddings, layers)."""
    refused: ClassVar[dict[str, str]] = {}
    """Model class names of the family that cannot be reduced → why."""
    grid_classes: ClassVar[dict[str, str]] = {}
    """Supported model class names whose forward reads every layer's output as the patch grid → what
    reads it (:meth:`grid_reason`: reduced only with restoration, every layer's output restored)."""
    layers_path: ClassVar[str] = "layers"
    """Attribute path from the backbone to its ``nn.ModuleList`` of layers."""
    layer_class: ClassVar[str] = ""
    attn_name: ClassVar[str] = "attention"
    norm1_name: ClassVar[str] = "layernorm_before"
    norm2_name: ClassVar[str] = "layernorm_after"
    out_proj_name: ClassVar[str] = "o_proj"
    scale_name: ClassVar[str] = "scaling"
    dropout_name: ClassVar[str] = "attention_dropout"
    num_prefix: ClassVar[int] = 1
    has_class_token: ClassVar[bool] = True
    model_members = {"forward": _model_forward, "gradient_checkpointing_enable": _refuse_checkpointing,
                     "activation_checkpointing_enable": _refuse_checkpointing}

    # -- the model ------------------------------------------------------------------------------------
    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return stock_class(model).__module__.startswith(cls.module_prefix)

    @classmethod
    def grid_reason(cls, model: nn.Module) -> str | None:
        return cls.grid_classes.get(stock_class(model).__name__)

    @classmethod
    def supported_classes(cls) -> str:
        return ", ".join(cls.classes)

    @classmethod
    def check_supported(cls, model: nn.Module) -> None:
        require_transformers()
        name = stock_class(model).__name__
        if name in cls.refused:
            raise TypeError(f"tokenreduce cannot reduce {name}: {cls.refused[name]}; supported: "
                            f"{cls.supported_classes()}")
        if name not in cls.classes:
            raise TypeError(f"tokenreduce cannot adapt {name}; supported {cls.name} classes: {cls.supported_classes()}")
        layers = cls.blocks(model)
        if not layers:
            raise TypeError(f"tokenreduce cannot reduce {name}: it has no layers")
        for i, layer in enumerate(layers):
            layer_cls = stock_class(layer)
            attn = getattr(layer, cls.attn_name, None)
            if layer_cls.__name__ != cls.layer_class or not all(
                    isinstance(getattr(attn, p, None), nn.Linear) for p in ("q_proj", "k_proj", "v_proj")):
                raise TypeError(
                    f"tokenreduce cannot adapt layer {i} ({layer_cls.__name__}) of {name}: expected a stock "
                    f"{cls.layer_class} with q_proj / k_proj / v_proj projections (transformers >= {MIN_TRANSFORMERS})"
                )
            check_attention_implementation(attention_implementation(attn))
            if getattr(layer, "gradient_checkpointing", False):
                raise ValueError(_CHECKPOINTING_MESSAGE)
        cls.check_model(model)

    @classmethod
    def check_model(cls, model: nn.Module) -> None:
        """Family-specific refusals (called last by :meth:`check_supported`)."""

    @classmethod
    def backbone(cls, model: nn.Module) -> nn.Module:
        """The module holding the embeddings and the layers."""
        return submodule(model, cls.classes.get(stock_class(model).__name__, ""))

    @classmethod
    def blocks(cls, model: nn.Module) -> Sequence[nn.Module]:
        return list(submodule(cls.backbone(model), cls.layers_path))

    @classmethod
    def patch_embedding(cls, model: nn.Module) -> nn.Module:
        """The backbone's patch-embedding convolution (ViT, DeiT and DINOv2's layout by default)."""
        return cls.backbone(model).embeddings.patch_embeddings.projection

    @classmethod
    def num_patches(cls, model: nn.Module) -> int:
        return int(cls.backbone(model).embeddings.patch_embeddings.num_patches)

    @classmethod
    def head_modules(cls, model: nn.Module) -> list[nn.Module]:
        """Modules run once per image after the layers (classifiers, poolers, projections)."""
        return []

    @classmethod
    def pool_cost(cls, model: nn.Module) -> tuple[int, int]:
        """``(per image, per token)`` MACs of an attention-pool head (``(0, 0)`` without one)."""
        return 0, 0

    @classmethod
    def num_classes(cls, model: nn.Module) -> int:
        return int(getattr(model.config, "num_labels", 0) or 0) if hasattr(model, "classifier") else 0

    @classmethod
    def model_info(cls, model: nn.Module) -> ModelInfo:
        config = cls.backbone(model).config  # a two-tower classifier's own config has no widths
        layers = cls.blocks(model)
        attns = [getattr(layer, cls.attn_name) for layer in layers]
        pool_image, pool_token = cls.pool_cost(model)
        cost = CostModel(
            attn_linear=tuple(linear_macs(a) for a in attns),
            attn_dim=tuple(a.q_proj.out_features for a in attns),
            mlp_linear=tuple(linear_macs(layer.mlp) for layer in layers),
            patch_embed=conv_macs(cls.patch_embedding(model)),
            head=sum(linear_macs(h) for h in cls.head_modules(model)) + pool_image,
            pool_token=pool_token,
        )
        name = getattr(model.config, "name_or_path", "") or getattr(model.config, "model_type", "")
        return ModelInfo(
            depth=len(layers),
            dim=int(config.hidden_size),
            num_heads=int(config.num_attention_heads),
            num_prefix=cls.num_prefix,
            num_patches=cls.num_patches(model),
            cost=cost,
            num_classes=cls.num_classes(model),
            has_class_token=cls.has_class_token,
            architecture=f"hf:{name}",
            family=cls.name,
        )

    @classmethod
    def reduced_forward(cls, base: type) -> Callable[..., Any] | None:
        """The forward of a reduced model of stock class ``base`` when its stock forward does not fit
        reduced tokens (a head that averages them), else ``None`` (the stock forward runs)."""
        return None

    @classmethod
    def data_config(cls, model: nn.Module, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """timm's data config equivalent to the model's image processor, read from the
        ``preprocessor_config.json`` beside its weights (``processor.save_pretrained(DIR)``;
        :func:`processor_data_config`); ``overrides`` (timm's keys) win.

        Raises:
            ValueError: no processor settings beside the model, or settings timm's pipeline cannot follow.
        """
        import json
        from pathlib import Path

        source = getattr(cls.backbone(model).config, "_name_or_path", "") or getattr(model.config, "_name_or_path", "")
        settings = Path(source) / PROCESSOR_FILE if source else None
        if settings is None or not settings.is_file():
            raise ValueError(
                f"reading images for this {cls.name} model needs its image processor's settings, {PROCESSOR_FILE} in "
                f"the model's directory ({source or 'unknown: the model was not loaded from one'}); save them there "
                "with processor.save_pretrained(DIR), or preprocess the images yourself and use the Python API"
            )
        try:
            config = processor_data_config(json.loads(settings.read_text()), cls.input_size(model))
        except ValueError as err:
            raise ValueError(f"{settings}: {err}") from err
        return {**config, **(overrides or {})}

    final_norm_name: ClassVar[str | None] = "layernorm"
    """The backbone's norm on the final tokens (``None``: the tokens leaving the last layer are final)."""

    @classmethod
    def input_size(cls, model: nn.Module) -> tuple[int, int, int]:
        config = cls.backbone(model).config
        h, w = _pair(config.image_size)
        return int(getattr(config, "num_channels", 3)), h, w

    @classmethod
    def patch_size(cls, model: nn.Module) -> tuple[int, int]:
        return _pair(cls.backbone(model).config.patch_size)

    @classmethod
    def final_tokens_module(cls, model: nn.Module) -> nn.Module:
        if cls.final_norm_name is None:
            return cls.blocks(model)[-1]
        return getattr(cls.backbone(model), cls.final_norm_name)

    @classmethod
    def block_forward(cls) -> Callable[..., Any]:
        return _block_forward

    # -- one layer ------------------------------------------------------------------------------------
    @classmethod
    def attention(
        cls, block: nn.Module, x: Tensor, bias: Tensor | None, needs: AttentionNeeds, key_mask: KeyMask | None,
        packed: Tensor | None, class_token: bool,
    ) -> tuple[Tensor, AttentionSignals]:
        """The layer's pre-norm and attention on B×N×C tokens (ΣN×C live rows when ``packed``)."""
        attn = getattr(block, cls.attn_name)
        impl = attention_implementation(attn)
        check_attention_implementation(impl)
        h = getattr(block, cls.norm1_name)(x)
        scale = getattr(attn, cls.scale_name)
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        if ragged_applies(h.dtype, needs, key_mask, packed, attn.training):  # padded batch, without the padding
            qkv = tuple(proj(h).view(h.shape[0], -1, attn.head_dim) for proj in projections)
            out, signals = attend_ragged(qkv, packed, scale, bias, needs, key_mask)
            return getattr(attn, cls.out_proj_name)(out), signals
        q, k, v = (split_heads(unpack_rows(proj(h), packed, key_mask), attn.head_dim) for proj in projections)
        p = float(getattr(attn, cls.dropout_name, 0.0) or 0.0)
        dropout = nn.Dropout(p) if attn.training and p > 0 else None
        out, signals = attend(q, k, v, scale, bias, needs, key_mask, class_token=class_token,
                              training=attn.training, dropout=dropout, fused=impl == "sdpa")
        return getattr(attn, cls.out_proj_name)(pack_rows(merge_heads(out), packed)), signals

    @classmethod
    def attention_residual(cls, block: nn.Module, out: Tensor) -> Tensor:
        return out

    @classmethod
    def mlp(cls, block: nn.Module, x: Tensor) -> Tensor:
        return block.mlp(getattr(block, cls.norm2_name)(x))


def _pair(value: Any) -> tuple[int, int]:
    """An HF config size (an int or a pair) as (height, width)."""
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def split_heads(x: Tensor, head_dim: int) -> Tensor:
    """B×N×(H·d) projections → B×H×N×d per-head tensors."""
    b, n, _ = x.shape
    return x.view(b, n, -1, head_dim).transpose(1, 2)


# -- loading ---------------------------------------------------------------------------------------------

HF_PREFIX = "hf:"
"""Model names ``hf:DIR_OR_ID`` are Hugging Face models (:func:`load_hf_model`)."""


PROCESSOR_FILE = "preprocessor_config.json"
"""The image processor's settings in a ``save_pretrained`` directory."""

PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
"""PIL's resampling filters (an image processor's ``resample``) by timm's interpolation names."""


def _height_width(value: Any, what: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, dict) and "height" in value and "width" in value:
        return int(value["height"]), int(value["width"])
    raise ValueError(f"unsupported {what} {value!r} (expected {{'height': H, 'width': W}})")


def processor_data_config(settings: Mapping[str, Any], input_size: tuple[int, int, int]) -> dict[str, Any]:
    """timm's data config that reads images as an HF image processor with ``settings`` does.

    ``size={'height', 'width'}`` (ViT, DeiT, SigLIP) resizes each edge: timm's ``squash`` crop mode;
    ``size={'shortest_edge'}`` with a centre crop (CLIP, DINOv2) keeps the aspect ratio: ``center`` with
    ``crop_pct = crop / shortest edge``.  Pixels are scaled by 1/255 and normalised with the processor's
    mean and std.  Resizing agrees with the processor's to a pixel level here and there (two resize
    implementations); images already at the model's size give the same tensor.

    Args:
        settings: the processor's ``to_dict()`` / ``preprocessor_config.json``.
        input_size: the model's (C, H, W).

    Raises:
        ValueError: settings timm's pipeline cannot follow (no resize, another rescale factor, a shortest-edge
            resize without a crop, a longest-edge resize), or an output size other than the model's.
    """
    channels, height, width = input_size
    if not settings.get("do_rescale", True) or not math.isclose(settings.get("rescale_factor", 1 / 255), 1 / 255):
        raise ValueError(f"do_rescale={settings.get('do_rescale')!r}, "
                         f"rescale_factor={settings.get('rescale_factor')!r}: timm's pipeline scales pixels by 1/255")
    if not settings.get("do_resize", True):
        raise ValueError("do_resize=False: the images would have to come at the model's size")
    size = settings.get("size")
    crop = _height_width(settings["crop_size"], "crop_size") if settings.get("do_center_crop") else None
    if isinstance(size, dict) and "shortest_edge" in size:
        if crop is None:
            raise ValueError("resizing the shortest edge without a centre crop gives images of varying shapes")
        edge = int(size["shortest_edge"])
        out, mode, crop_pct = crop, "center", crop[0] / edge
        if math.floor(crop[0] / crop_pct) != edge:  # timm resizes to floor(size / crop_pct): keep it at the edge
            crop_pct = crop[0] / (edge + 0.5)
    else:
        resized = _height_width(size, "size")
        out, mode = crop or resized, "squash"
        crop_pct = crop[0] / resized[0] if crop else 1.0
    if out != (height, width):
        raise ValueError(f"the processor makes {out[0]}×{out[1]} images but the model takes {height}×{width}")
    resample = settings.get("resample", 2)
    if resample not in PIL_RESAMPLE:
        raise ValueError(f"unsupported resample={resample!r}")
    normalise = settings.get("do_normalize", True)
    mean = tuple(float(v) for v in settings.get("image_mean", ())) if normalise else (0.0,) * channels
    std = tuple(float(v) for v in settings.get("image_std", ())) if normalise else (1.0,) * channels
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"image_mean / image_std need {channels} values, got {mean} / {std}")
    return {"input_size": (channels, height, width), "interpolation": PIL_RESAMPLE[resample], "mean": mean,
            "std": std, "crop_pct": crop_pct, "crop_mode": mode}


def load_hf_model(source: str, *, img_size: int | None = None, model_kwargs: Mapping[str, Any] | None = None
                  ) -> nn.Module:
    """A Hugging Face model from a local directory (``save_pretrained`` output; offline) or a hub id.

    The class is the one the directory's ``config.json`` names (``architectures[0]``, e.g.
    ``CLIPVisionModelWithProjection``), else ``AutoModelForImageClassification``, else ``AutoModel``.

    Args:
        source: a directory or a hub id (``hf:`` already removed).
        img_size: refused: an HF model takes its input size from its config (call it with
            ``interpolate_pos_encoding=True`` for other sizes).
        model_kwargs: ``from_pretrained`` keyword arguments (``attn_implementation="eager"``, ``dtype``...).

    Raises:
        ValueError: ``img_size`` given, or an empty source.
        FileNotFoundError: ``source`` is a path that does not exist.
        TypeError: a keyword argument ``from_pretrained`` does not take.
        ModelLoadError: transformers is missing, or the model cannot be read or fetched.
    """
    from pathlib import Path

    from .loading import ModelLoadError

    if not source:
        raise ValueError(f"{HF_PREFIX} needs a directory or a hub id after it ({HF_PREFIX}DIR_OR_ID)")
    if img_size is not None:
        raise ValueError(
            f"{HF_PREFIX}{source}: a Hugging Face model takes its input size from its config (image_size), so "
            "img_size does not apply; call the model with interpolate_pos_encoding=True to run other sizes"
        )
    try:
        transformers = require_transformers()
    except MissingExtraError as err:
        raise ModelLoadError(str(err)) from err
    path = Path(source).expanduser()
    if not path.is_dir() and (path.exists() or source.startswith(("/", ".", "~")) or source.count("/") > 1):
        raise FileNotFoundError(f"{HF_PREFIX}{source}: no such directory (expected a save_pretrained folder)")
    location = str(path) if path.is_dir() else source
    kwargs = dict(model_kwargs or {})
    try:
        config = transformers.AutoConfig.from_pretrained(location)
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        if cls is not None:
            return cls.from_pretrained(location, **kwargs)
        try:
            return transformers.AutoModelForImageClassification.from_pretrained(location, **kwargs)
        except ValueError:  # not an image classification architecture
            return transformers.AutoModel.from_pretrained(location, **kwargs)
    except TypeError as err:
        raise TypeError(f"{HF_PREFIX}{source}: {err}") from err
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load {HF_PREFIX}{source} (a directory written by save_pretrained, or a hub "
                             f"id, which needs the internet): {err}") from err
