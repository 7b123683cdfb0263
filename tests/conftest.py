"""Shared fixtures: small randomly initialised timm ViTs that run fast on 2 CPU cores."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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


@contextlib.contextmanager
def kernel_mode(mode: str) -> Iterator[None]:
    """The fused CPU kernels in ``mode`` ("on" builds them or fails) inside the block, the earlier mode after it:
    for hypothesis tests, which take no function-scoped fixture (:func:`kernel_state`)."""
    saved = cpu_kernels._mode
    try:
        cpu_kernels.set_cpu_kernels(mode)
        yield
    finally:
        cpu_kernels._mode = saved


def run_with_and_without_kernels(model, images: torch.Tensor) -> dict[str, tuple[torch.Tensor, list[int]]]:
    """``{"on": (logits, tokens out of every block), "off": ...}``: ``model`` (reduced) on ``images`` with the fused CPU
    kernels on and off (use with the ``kernel_state`` fixture, which restores the mode)."""
    import tokenreduce as tr

    runs = {}
    for mode in ("on", "off"):
        cpu_kernels.set_cpu_kernels(mode)
        with torch.inference_mode():
            logits = model(images)
        runs[mode] = (logits, [b.tokens_out for b in tr.stats(model).blocks])
    return runs


def write_fashion_mnist(folder, split: str, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Fashion-MNIST's gzipped idx files for ``split`` ("train" / "t10k") in ``folder``: uint8 N×28×28 images,
    labels N (0…9)."""
    import gzip

    n, h, w = images.shape
    header = b"".join(v.to_bytes(4, "big") for v in (2051, n, h, w))
    pixels = images.to(torch.uint8).numpy().tobytes()
    (folder / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + pixels))
    header = b"".join(v.to_bytes(4, "big") for v in (2049, n))
    classes = labels.to(torch.uint8).numpy().tobytes()
    (folder / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(header + classes))
