"""DynamicViT's local-global token predictor (Rao et al., NeurIPS 2021), shared by DynamicViT and dTPS."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TokenPredictor(nn.Module):
    """Keep/drop log-probabilities for every patch token.

    ``LayerNorm → Linear(C, C) → GELU``; the channels are split into a local half
    and a global half; the global half is averaged over the currently live tokens
    (mask-weighted) and broadcast back; ``concat → Linear(C, C/2) → GELU →
    Linear(C/2, C/4) → GELU → Linear(C/4, 2) → log-softmax``.  Channel 0 is "keep".
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(dim, dim // 2),
            nn.GELU(),
            nn.Linear(dim // 2, dim // 4),
            nn.GELU(),
            nn.Linear(dim // 4, 2),
            nn.LogSoftmax(dim=-1),
        )

    def forward(self, x: Tensor, live: Tensor | None = None) -> Tensor:
        """Args: x B×M×C patch tokens; live B×M×1 mask (None = all live).  Returns B×M×2 log-probs."""
        x = self.in_conv(x)
        c = x.shape[-1]
        local, global_ = x[..., : c // 2], x[..., c // 2 :]
        if live is None:
            pooled = global_.mean(dim=1, keepdim=True)
        else:
            live = live.to(x.dtype)
            pooled = (global_ * live).sum(dim=1, keepdim=True) / live.sum(dim=1, keepdim=True).clamp_min(1e-6)
        return self.out_conv(torch.cat([local, pooled.expand_as(global_)], dim=-1))

    def macs(self, num_tokens: int) -> int:
        """Multiply-accumulates per image for ``num_tokens`` patch tokens."""
        linears = [m for m in self.modules() if isinstance(m, nn.Linear)]
        return num_tokens * sum(m.in_features * m.out_features for m in linears)


@functools.lru_cache(maxsize=64)
def predictor_macs_per_token(dim: int) -> int:
    """MACs per patch token of a :class:`TokenPredictor` of width ``dim`` (counted on a meta-device copy)."""
    with torch.device("meta"):
        return TokenPredictor(dim).macs(1)


def gumbel_keep(log_probs: Tensor, tau: float = 1.0) -> Tensor:
    """Hard straight-through Gumbel-softmax sample of "keep" (B×M×2 log-probs → B×M×1 in {0, 1})."""
    return F.gumbel_softmax(log_probs, tau=tau, hard=True)[..., :1]
