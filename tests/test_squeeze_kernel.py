"""TPS's fused CPU squeeze (ops/csrc/squeeze.cpp): a hand-worked case on both paths, agreement with the PyTorch
path on random states (ties, zero rows, sizes, temperatures), and when it is (not) used."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import kernel_mode, make_vit, run_with_and_without_kernels
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenreduce as tr
from tokenreduce.ops import cpu_kernels
from tokenreduce.ops.squeeze import squeeze_state
from tokenreduce.state import TokenState

E = math.e


@pytest.mark.parametrize("mode", ["on", "off"])
def test_hand_worked_squeeze_on_both_paths(kernel_state, mode):
    cpu_kernels.set_cpu_kernels(mode)
    # CLS, r0=(1,0), p0=(2,0), r1=(0,1), p1=(3,4); keep r0, r1.  cos(p0, r0) = 1: host r0, weight e;
    # cos(p1, r0) = 0.6 < cos(p1, r1) = 0.8: host r1, weight e^0.8.  A second image keeps p1 only.
    x = torch.tensor([[[5.0, 5.0], [1, 0], [2, 0], [0, 1], [3, 4]]] * 2)
    size = torch.tensor([[1.0, 1, 2, 1, 3]] * 2).unsqueeze(-1)
    keep = torch.tensor([[0, 2], [3, 0]])
    drop = torch.tensor([[1, 3], [1, 2]])
    out = squeeze_state(TokenState(x, size, num_prefix=1), keep, drop)
    w = math.exp(0.8)
    expected0 = [[5.0, 5.0], [1.5, 0.0], [3 * w / (E + w), (E + 4 * w) / (E + w)]]
    torch.testing.assert_close(out.x[0], torch.tensor(expected0))
    assert out.size[..., 0].tolist()[0] == [1.0, 3.0, 4.0]
    # image 1: hosts p1=(3,4) and r0=(1,0); p0=(2,0) picks r0 (cos 1 > 0.6), r1=(0,1) picks p1 (0.8 > 0)
    w1 = math.exp(0.8)
    expected1 = [[5.0, 5.0], [3 * E / (E + w1), (4 * E + w1) / (E + w1)], [(E + E * 2) / (2 * E), 0.0]]
    torch.testing.assert_close(out.x[1], torch.tensor(expected1))
    assert out.size[..., 0].tolist()[1] == [1.0, 3.0 + 1.0, 1.0 + 2.0]


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    batch=st.integers(1, 3),
    patches=st.integers(2, 16),
    prefix=st.integers(0, 2),
    channels=st.integers(1, 9),
    with_size=st.booleans(),
    temperature=st.sampled_from([1.0, 0.5, 2.7]),
    data=st.data(),
)
def test_kernel_agrees_with_the_python_path(batch, patches, prefix, channels, with_size, temperature, data):
    keep = data.draw(st.integers(1, patches - 1))
    seed = data.draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    n = prefix + patches
    x = torch.randn(batch, n, channels, generator=g)
    x[:, -1] = x[:, prefix]  # an exact cosine-1 pair: ties between hosts when both are kept
    if patches > 3:
        x[:, prefix + 1] = 0.0  # a zero row (its norm is clamped, not divided by)
    size = torch.randint(1, 5, (batch, n, 1), generator=g).float() if with_size else None
    perm = torch.stack([torch.randperm(patches, generator=g) for _ in range(batch)])
    state = TokenState(x, size, num_prefix=prefix)
    results = {}
    for mode in ("on", "off"):
        with kernel_mode(mode):
            results[mode] = squeeze_state(state, perm[:, :keep], perm[:, keep:], temperature)
    fused, python = results["on"], results["off"]
    assert fused.x.shape == python.x.shape == (batch, prefix + keep, channels)
    torch.testing.assert_close(fused.x, python.x, rtol=1e-6, atol=1e-6)
    assert torch.equal(fused.sizes(), python.sizes())


def test_kernel_is_used_only_where_it_gives_the_python_result(kernel_state, monkeypatch):
    cpu_kernels.set_cpu_kernels("on")
    real = cpu_kernels.load_cpu_kernels()
    calls = []
    monkeypatch.setattr(cpu_kernels, "_module", type("Spy", (), {"squeeze_tokens": staticmethod(
        lambda *args: calls.append(1) or real.squeeze_tokens(*args))}))
    b, n = 2, 7
    x = torch.randn(b, n, 4)
    keep, drop = torch.tensor([[0, 2, 4], [5, 1, 3]]), torch.tensor([[1, 3, 5], [0, 2, 4]])
    squeeze_state(TokenState(x), keep, drop)
    assert len(calls) == 1  # eligible: CPU, float32, no grad, no sources, masks, positions or restoration

    squeeze_state(TokenState(x, source=torch.eye(n).expand(b, n, n)), keep, drop)
    squeeze_state(TokenState(x, owner=torch.arange(n).expand(b, n)), keep, drop)
    squeeze_state(TokenState(x, mask=torch.ones(b, n, 1)), keep, drop)
    squeeze_state(TokenState(x, pos=torch.arange(n).view(1, n, 1).expand(b, n, 1)), keep, drop)
    squeeze_state(TokenState(x.bfloat16()), keep, drop)
    squeeze_state(TokenState(x.clone().requires_grad_()), keep, drop)
    assert len(calls) == 1
    cpu_kernels.set_cpu_kernels("off")
    squeeze_state(TokenState(x), keep, drop)
    assert len(calls) == 1


@pytest.mark.parametrize("method", ["tps", "dtps"])
def test_reduced_model_logits_with_and_without_the_kernel(kernel_state, method):
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    runs = run_with_and_without_kernels(tr.apply(make_vit(), method, untrained=True, budget=0.6), images)
    (on, counts_on), (off, counts_off) = runs["on"], runs["off"]
    assert counts_on == counts_off and counts_on[-1] < 65
    torch.testing.assert_close(on, off, rtol=1e-5, atol=1e-5)
