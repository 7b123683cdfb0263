"""Shared fixtures: small randomly initialised timm ViTs that run fast on 2 CPU cores."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from tokenreduce.ops import cpu_kernels

# The tests run tiny tensors: one intra-op thread is fastest and keeps parallel runs from oversubscribing.
torch.set_num_threads(1)


def make_vit(**overrides) -> VisionTransformer:
    """A 12-block ViT on 64×64 images with 8×8 patches (64 patch tokens + prefix)."""
    kwargs = dict(img_size=64, patch_size=8, embed_dim=64, depth=12, num_heads=4, num_classes=10)
    kwargs.update(overrides)
    torch.manual_seed(0)
    return VisionTransformer(**kwargs).eval()


@pytest.fixture
def vit() -> VisionTransformer:
    return make_vit()


@pytest.fixture
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(4, 3, 64, 64)


def free_port() -> str:
    """A TCP port free on this machine right now, for a torchrun rendezvous (fixed ports clash between runs)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.fixture
def kernel_state():
    """Restore the module's mode / build state after a test changes it."""
    saved = (cpu_kernels._mode, cpu_kernels._module, cpu_kernels._failure)
    yield
    cpu_kernels._mode, cpu_kernels._module, cpu_kernels._failure = saved
