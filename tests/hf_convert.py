"""Test helper: the same small ViT in timm and in Hugging Face transformers, with the same random weights.

timm and transformers implement the same ViT, DeiT (distilled), DINOv2 and CLIP vision encoders.
Each ``*_pair`` function builds a small timm model from its constructor (never a hub download),
the matching HF model from a config object, and copies every timm weight into the HF model
module by module: timm's fused ``qkv`` projection is split into ``q_proj`` / ``k_proj`` /
``v_proj``, ``proj`` becomes the output projection, LayerScale ``gamma`` becomes ``lambda1``.
Both models are in eval mode and compute the same function (LayerNorm eps 1e-6 on both sides,
exact-erf GELU, or quick-GELU for CLIP).

Geometry (:data:`GEOMETRY`): 12 blocks of width 64 with 4 heads on 64×64 images with 8×8
patches (64 patch tokens), as ``conftest.make_vit``, so every method's paper defaults apply.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from torch import nn

GEOMETRY = dict(img_size=64, patch_size=8, embed_dim=64, depth=12, num_heads=4)
NUM_CLASSES = 10
EPS = 1e-6


def _copy_linear(dst: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    dst.weight.copy_(weight)
    if dst.bias is not None:
        dst.bias.copy_(bias if bias is not None else torch.zeros_like(dst.bias))


def _copy_module(dst: nn.Module, src: nn.Module) -> None:
    dst.load_state_dict(src.state_dict())


def _copy_attention(dst: nn.Module, src: nn.Module, out_name: str) -> None:
    """timm ``Attention`` (fused qkv, proj) → HF attention (q_proj, k_proj, v_proj, out projection)."""
    weights = src.qkv.weight.chunk(3)
    biases = src.qkv.bias.chunk(3) if src.qkv.bias is not None else (None, None, None)
    for proj, w, b in zip((dst.q_proj, dst.k_proj, dst.v_proj), weights, biases, strict=True):
        _copy_linear(proj, w, b)
    _copy_module(getattr(dst, out_name), src.proj)


def _config_kwargs(attn_implementation: str) -> dict[str, Any]:
    g = GEOMETRY
    return dict(hidden_size=g["embed_dim"], num_hidden_layers=g["depth"], num_attention_heads=g["num_heads"],
                image_size=g["img_size"], patch_size=g["patch_size"], layer_norm_eps=EPS,
                attn_implementation=attn_implementation)


def _randomize(model: nn.Module, seed: int) -> None:
    """Give every parameter (LayerNorms and LayerScales too) random values of a reasonable scale."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):  # LayerScale: around 0.5 so every block matters
                p.copy_(0.5 + 0.1 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.02 * 3 * torch.randn(p.shape, generator=gen))


@torch.no_grad()
def _copy_vit_layers(hf_layers: Any, blocks: Any, norm1: str, norm2: str, attn: str, out: str,
                     layer_scale: bool = False) -> None:
    for hf, blk in zip(hf_layers, blocks, strict=True):
        _copy_module(getattr(hf, norm1), blk.norm1)
        _copy_module(getattr(hf, norm2), blk.norm2)
        _copy_attention(getattr(hf, attn), blk.attn, out)
        _copy_module(hf.mlp.fc1, blk.mlp.fc1)
        _copy_module(hf.mlp.fc2, blk.mlp.fc2)
        if layer_scale:
            hf.layer_scale1.lambda1.copy_(blk.ls1.gamma)
            hf.layer_scale2.lambda1.copy_(blk.ls2.gamma)


def vit_pair(attn_implementation: str = "sdpa", seed: int = 0) -> tuple[VisionTransformer, nn.Module]:
    """timm ``VisionTransformer`` ↔ HF ``ViTForImageClassification`` (class token, token-0 classifier)."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    timm_model = VisionTransformer(**GEOMETRY, num_classes=NUM_CLASSES).eval()
    _randomize(timm_model, seed)
    config = ViTConfig(**_config_kwargs(attn_implementation), intermediate_size=4 * GEOMETRY["embed_dim"],
                       num_labels=NUM_CLASSES, hidden_act="gelu", qkv_bias=True)
    hf = ViTForImageClassification(config).eval()
    with torch.no_grad():
        emb = hf.vit.embeddings
        emb.cls_token.copy_(timm_model.cls_token)
        emb.position_embeddings.copy_(timm_model.pos_embed)
        _copy_module(emb.patch_embeddings.projection, timm_model.patch_embed.proj)
        _copy_vit_layers(hf.vit.layers, timm_model.blocks, "layernorm_before", "layernorm_after", "attention", "o_proj")
        _copy_module(hf.vit.layernorm, timm_model.norm)
        _copy_module(hf.classifier, timm_model.head)
    return timm_model, hf


def deit_pair(attn_implementation: str = "sdpa", seed: int = 0) -> tuple[VisionTransformerDistilled, nn.Module]:
    """timm distilled DeiT ↔ HF ``DeiTForImageClassificationWithTeacher`` (class + distillation token;
    both average the two heads' logits in eval mode)."""
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    torch.manual_seed(seed)
    timm_model = VisionTransformerDistilled(**GEOMETRY, num_classes=NUM_CLASSES).eval()
    _randomize(timm_model, seed)
    config = DeiTConfig(**_config_kwargs(attn_implementation), intermediate_size=4 * GEOMETRY["embed_dim"],
                        num_labels=NUM_CLASSES, hidden_act="gelu", qkv_bias=True)
    hf = DeiTForImageClassificationWithTeacher(config).eval()
    with torch.no_grad():
        emb = hf.deit.embeddings
        emb.cls_token.copy_(timm_model.cls_token)
        emb.distillation_token.copy_(timm_model.dist_token)
        emb.position_embeddings.copy_(timm_model.pos_embed)
        _copy_module(emb.patch_embeddings.projection, timm_model.patch_embed.proj)
        _copy_vit_layers(hf.deit.layers, timm_model.blocks, "layernorm_before", "layernorm_after", "attention",
                         "o_proj")
        _copy_module(hf.deit.layernorm, timm_model.norm)
        _copy_module(hf.cls_classifier, timm_model.head)
        _copy_module(hf.distillation_classifier, timm_model.head_dist)
    return timm_model, hf


def dinov2_pair(attn_implementation: str = "sdpa", seed: int = 0, classifier: bool = False
                ) -> tuple[VisionTransformer, nn.Module]:
    """timm ``vit_small_patch14_dinov2``-like ViT (LayerScale, no head) ↔ HF ``Dinov2Model`` (or, with
    ``classifier``, ``Dinov2ForImageClassification``, whose classifier has no timm counterpart and keeps
    its random weights).  timm's output is HF's ``pooler_output`` (the class token after the final norm)."""
    from transformers import Dinov2Config, Dinov2ForImageClassification, Dinov2Model

    torch.manual_seed(seed)
    timm_model = VisionTransformer(**GEOMETRY, num_classes=0, init_values=1e-5).eval()
    _randomize(timm_model, seed)
    config = Dinov2Config(**_config_kwargs(attn_implementation), mlp_ratio=4, hidden_act="gelu", qkv_bias=True,
                          layerscale_value=1e-5, num_labels=NUM_CLASSES)
    hf = (Dinov2ForImageClassification if classifier else Dinov2Model)(config).eval()
    backbone = hf.dinov2 if classifier else hf
    with torch.no_grad():
        emb = backbone.embeddings
        emb.cls_token.copy_(timm_model.cls_token)
        emb.position_embeddings.copy_(timm_model.pos_embed)
        _copy_module(emb.patch_embeddings.projection, timm_model.patch_embed.proj)
        _copy_vit_layers(backbone.encoder.layer, timm_model.blocks, "norm1", "norm2", "attention", "o_proj",
                         layer_scale=True)
        _copy_module(backbone.layernorm, timm_model.norm)
    return timm_model, hf


def clip_pair(attn_implementation: str = "sdpa", seed: int = 0, projection_dim: int = 32
              ) -> tuple[VisionTransformer, nn.Module]:
    """timm CLIP-style ViT (``pre_norm``, quick-GELU, class token, bias-free head) ↔ HF
    ``CLIPVisionModelWithProjection``: timm's output is HF's ``image_embeds``.

    HF applies ``post_layernorm`` to the pooled class token only, timm's ``norm`` to every token
    before pooling the class token: the same ``image_embeds``, different ``last_hidden_state``.
    """
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    timm_model = VisionTransformer(**GEOMETRY, num_classes=projection_dim, pre_norm=True,  # pre_norm: no patch bias
                                   act_layer="quick_gelu").eval()
    _randomize(timm_model, seed)
    with torch.no_grad():
        timm_model.head.bias.zero_()
    config = CLIPVisionConfig(**_config_kwargs(attn_implementation), intermediate_size=4 * GEOMETRY["embed_dim"],
                              projection_dim=projection_dim, hidden_act="quick_gelu")
    hf = CLIPVisionModelWithProjection(config).eval()
    vm = hf.vision_model
    with torch.no_grad():
        emb = vm.embeddings
        emb.class_embedding.copy_(timm_model.cls_token.reshape(-1))
        emb.position_embedding.weight.copy_(timm_model.pos_embed[0])
        emb.patch_embedding.weight.copy_(timm_model.patch_embed.proj.weight)
        _copy_module(vm.pre_layrnorm, timm_model.norm_pre)
        _copy_vit_layers(vm.encoder.layers, timm_model.blocks, "layer_norm1", "layer_norm2", "self_attn", "out_proj")
        _copy_module(vm.post_layernorm, timm_model.norm)
        hf.visual_projection.weight.copy_(timm_model.head.weight)
    return timm_model, hf


PAIRS = {"vit": vit_pair, "deit": deit_pair, "dinov2": dinov2_pair, "clip": clip_pair}
"""Family → pair builder."""


def hf_output(family: str, out: Any) -> torch.Tensor:
    """The HF output that equals the timm model's ``forward`` output."""
    if family in ("vit", "deit"):
        return out.logits
    if family == "dinov2":
        return out.pooler_output
    return out.image_embeds


def small_config_model(name: str, attn_implementation: str = "sdpa", **overrides: Any) -> nn.Module:
    """One HF model of class ``name`` in the :data:`GEOMETRY` (4 layers), random weights, eval mode."""
    import transformers

    g = dict(GEOMETRY, depth=4)
    family = {"ViT": "ViTConfig", "DeiT": "DeiTConfig", "Dinov2": "Dinov2Config", "CLIP": "CLIPVisionConfig",
              "Siglip": "SiglipVisionConfig"}
    config_name = next(v for k, v in family.items() if name.startswith(k))
    kwargs = dict(hidden_size=g["embed_dim"], num_hidden_layers=g["depth"], num_attention_heads=g["num_heads"],
                  image_size=g["img_size"], patch_size=g["patch_size"], attn_implementation=attn_implementation,
                  num_labels=NUM_CLASSES)
    if config_name != "Dinov2Config":
        kwargs["intermediate_size"] = 4 * g["embed_dim"]
    kwargs.update(overrides)
    config = getattr(transformers, config_name)(**kwargs)
    if name in ("CLIPForImageClassification", "SiglipForImageClassification"):  # two-tower configs
        outer = getattr(transformers, config_name.replace("Vision", ""))
        config = outer(vision_config=config.to_dict(), num_labels=NUM_CLASSES, attn_implementation=attn_implementation)
    torch.manual_seed(0)
    return getattr(transformers, name)(config).eval()
