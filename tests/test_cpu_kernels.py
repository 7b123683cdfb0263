"""The fused CPU merge kernel (ops/csrc/bipartite_merge.cpp): hand-worked cases, equality
with the PyTorch path, and when it is (not) used."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import kernel_mode, make_vit
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenreduce as tr
from tokenreduce.ops import cpu_kernels
from tokenreduce.ops.gather import head_mean
from tokenreduce.ops.matching import bipartite_soft_matching, max_merges
from tokenreduce.ops.merge import bipartite_merge, merge_wavg
from tokenreduce.state import TokenState

# Five tokens in 2-D, position 0 the class token: A′ = {2, 4}, B′ = {1, 3}.
# Token 2 points exactly where token 3 points (cosine 1); token 4 is closer to token 1 than to 3.
METRIC = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 2.0], [0.2, 1.0]]])
X = torch.tensor([[[10.0], [1.0], [2.0], [4.0], [8.0]]])


@pytest.fixture
def fused(kernel_state):
    """Mode "on": the kernel is built (or the test fails) and used wherever eligible."""
    cpu_kernels.set_cpu_kernels("on")
    return cpu_kernels.load_cpu_kernels()


def python_path(state: TokenState, metric: torch.Tensor, r: int) -> TokenState:
    return merge_wavg(state, bipartite_soft_matching(metric, r, state.num_prefix))


def fused_call(state: TokenState, metric: torch.Tensor, r: int) -> TokenState:
    out = cpu_kernels.fused_bipartite_merge(state.x, state.size, metric, r, state.num_prefix)
    assert out is not None, "the kernel should have been eligible"
    return TokenState(out[0], out[1], None, state.num_prefix)


def test_kernel_merges_most_similar_pair_in_tome_order(fused):
    state = fused_call(TokenState(X, num_prefix=1), METRIC, 1)
    # [class] ++ unmerged A′ (token 4) ++ B′ (token 1, token 3 absorbing token 2).
    assert state.x.flatten().tolist() == [10.0, 8.0, 1.0, 3.0]
    assert state.size.flatten().tolist() == [1.0, 1.0, 1.0, 2.0]


def test_kernel_weights_by_size(fused):
    sizes = torch.tensor([[[1.0], [1.0], [3.0], [1.0], [1.0]]])
    state = fused_call(TokenState(X, size=sizes, num_prefix=1), METRIC, 2)
    # token 4 -> token 1: (8 + 1) / 2; token 2 (size 3) -> token 3: (3·2 + 4) / 4.
    assert state.x.flatten().tolist() == pytest.approx([10.0, 4.5, 2.5])
    assert state.size.flatten().tolist() == [1.0, 2.0, 4.0]


def test_kernel_protects_a_distillation_token(fused):
    # Position 1 is a distillation token; token 2 is identical to it but must merge elsewhere.
    metric = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.2], [5.0, 5.0], [1.0, 1.0]]])
    x = torch.arange(6.0).view(1, 6, 1)
    state = fused_call(TokenState(x, num_prefix=2), metric, 1)
    # A′ = {2, 4}, B′ = {3, 5}: token 4 (cos 1 with 5) merges into 5; token 2 stays.
    assert state.x.flatten().tolist() == [0.0, 1.0, 2.0, 3.0, 4.5]
    assert state.size.flatten().tolist() == [1.0, 1.0, 1.0, 1.0, 2.0]


def test_kernel_breaks_ties_by_position(fused):
    # All cosines are 1: every A′ token picks the first B′ token, and the first r A′ tokens go.
    x = torch.arange(7.0).view(1, 7, 1)
    state = fused_call(TokenState(x, num_prefix=1), torch.ones(1, 7, 3), 2)
    # A′ = {2, 4, 6}, B′ = {1, 3, 5}: tokens 2 and 4 merge into 1.
    assert state.x.flatten().tolist() == pytest.approx([0.0, 6.0, 7.0 / 3.0, 3.0, 5.0])
    assert state.size.flatten().tolist() == [1.0, 1.0, 3.0, 1.0, 1.0]


def test_kernel_without_prefix_keeps_unmerged_tokens_in_edge_order(fused):
    # No prefix: A′ = {0, 2, 4}, B′ = {1, 3}. Edges: 0→1 (cos 0.894), 2→3 (cos 1), 4→1 (cos 0.995).
    metric = torch.tensor([[[1.0, 0.5], [1.0, 0.0], [0.0, 1.0], [0.0, 2.0], [1.0, 0.1]]])
    x = torch.tensor([[[1.0], [2.0], [3.0], [4.0], [5.0]]])
    state = fused_call(TokenState(x, num_prefix=0), metric, 1)
    # Token 2 merges into 3; the unmerged A′ tokens follow edge strength (4 before 0), as in ToMe.
    assert state.x.flatten().tolist() == [5.0, 1.0, 2.0, 3.5]


def test_kernel_matches_python_path_with_nan(fused):
    g = torch.Generator().manual_seed(0)
    metric = torch.randn(2, 11, 4, generator=g)
    metric[0, 4] = float("nan")  # an A′ row
    metric[1, 3] = float("nan")  # a B′ column
    state = TokenState(torch.randn(2, 11, 5, generator=g), num_prefix=1)
    expected, got = python_path(state, metric, 3), fused_call(state, metric, 3)
    assert torch.allclose(got.x, expected.x, equal_nan=True)
    assert torch.equal(got.size, expected.size)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    batch=st.integers(1, 3),
    n=st.integers(2, 40),
    channels=st.integers(1, 9),
    dim=st.sampled_from([1, 4, 16]),
    prefix=st.integers(0, 3),
    r_frac=st.floats(0.0, 1.0),
    with_size=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_kernel_equals_python_path(batch, n, channels, dim, prefix, r_frac, with_size, seed):
    with kernel_mode("on"):
        _compare_paths(batch, n, channels, dim, prefix, r_frac, with_size, seed)


def _compare_paths(batch, n, channels, dim, prefix, r_frac, with_size, seed):
    prefix = min(prefix, n)
    limit = max_merges(n, prefix)
    if limit == 0:
        return
    r = max(1, round(r_frac * limit))
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(batch, n, dim, generator=g)
    size = torch.randint(1, 5, (batch, n, 1), generator=g).float() if with_size else None
    state = TokenState(torch.randn(batch, n, channels, generator=g), size=size, num_prefix=prefix)
    expected, got = python_path(state, metric, r), fused_call(state, metric, r)
    assert got.x.shape == (batch, n - r, channels)
    assert torch.allclose(got.x, expected.x, atol=1e-6, rtol=1e-6)
    assert torch.equal(got.size, expected.size)


@pytest.mark.parametrize("batch", [1, 8])  # head_mean's small (one mean op) and large (adds in order) forms
@pytest.mark.parametrize("prefix", [0, 1])
def test_kernel_averages_per_head_keys_as_head_mean_does(fused, batch, prefix):
    # ToMe hands the kernel the keys of every head as the attention's strided view of the fused qkv output
    # (B×H×N×d); the kernel's head average must match head_mean's, so both paths merge the same tokens.
    g = torch.Generator().manual_seed(batch + 10 * prefix)
    n, heads, d, channels = 197, 6, 64, 12
    qkv = torch.randn(batch, n, 3 * heads * d, generator=g)
    keys = qkv.view(batch, n, 3, heads, d).permute(2, 0, 3, 1, 4)[1]  # B×H×N×d, not contiguous
    assert not keys.is_contiguous()
    size = torch.randint(1, 4, (batch, n, 1), generator=g).float()
    state = TokenState(torch.randn(batch, n, channels, generator=g), size=size, num_prefix=prefix)
    r = 40
    got = cpu_kernels.fused_bipartite_merge(state.x, state.size, keys, r, prefix)
    on_mean = cpu_kernels.fused_bipartite_merge(state.x, state.size, head_mean(keys), r, prefix)
    for a, b in zip(got, on_mean, strict=True):  # the kernel's head mean is head_mean's, bit for bit
        assert torch.equal(a, b)
    expected = python_path(state, head_mean(keys), r)
    assert torch.equal(got[1], expected.size)
    torch.testing.assert_close(got[0], expected.x, atol=1e-6, rtol=1e-6)
    cpu_kernels.set_cpu_kernels("off")  # bipartite_merge averages a 4-D metric itself on the Python path
    unfused = bipartite_merge(state, keys, r)
    assert torch.equal(unfused.size, expected.size) and torch.equal(unfused.x, expected.x)


def test_kernel_refuses_a_metric_of_the_wrong_rank(fused):
    x = torch.randn(1, 9, 4)
    with pytest.raises(RuntimeError, match="3-D or 4-D"):
        fused.bipartite_merge_wavg(x, None, torch.randn(1, 1, 1, 9, 4), 2, 1)


def test_kernel_matches_python_path_under_bf16_autocast(fused):
    # Autocast runs the similarity BMM in bfloat16 on both paths (many exact ties).
    g = torch.Generator().manual_seed(4)
    state = TokenState(torch.randn(2, 30, 8, generator=g), num_prefix=1)
    metric = torch.randn(2, 30, 16, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = python_path(state, metric, 9), fused_call(state, metric, 9)
    torch.testing.assert_close(got.x, expected.x, atol=1e-6, rtol=1e-6)
    assert torch.equal(got.size, expected.size)


def test_reduced_model_gives_the_same_logits_with_and_without_the_kernel(fused):
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    outputs = {}
    for method, kwargs in (("tome", {"r": 4}), ("ppt", {}), ("bat", {})):
        model = tr.apply(make_vit(), method, untrained=True, **kwargs)
        for mode in ("on", "off"):
            cpu_kernels.set_cpu_kernels(mode)
            with torch.inference_mode():
                outputs[method, mode] = model(images)
        torch.testing.assert_close(outputs[method, "on"], outputs[method, "off"], atol=1e-5, rtol=1e-5)


def test_kernel_is_used_only_where_it_gives_the_python_result(fused, monkeypatch):
    calls = []
    real = fused.bipartite_merge_wavg
    monkeypatch.setattr(cpu_kernels, "_module", type("Spy", (), {"bipartite_merge_wavg": staticmethod(
        lambda *args: calls.append(1) or real(*args))}))
    x = torch.randn(1, 9, 4)
    metric = torch.randn(1, 9, 3)

    bipartite_merge(TokenState(x), metric, 2)
    assert len(calls) == 1  # eligible: CPU, float32, no autograd

    leaf = x.clone().requires_grad_()
    merged = bipartite_merge(TokenState(leaf), metric, 2)
    merged.x.sum().backward()  # autograd needs the Python path
    assert leaf.grad is not None and len(calls) == 1

    bipartite_merge(TokenState(x.bfloat16()), metric, 2)
    bipartite_merge(TokenState(x, source=torch.eye(9).unsqueeze(0)), metric, 2)
    bipartite_merge(TokenState(x, mask=torch.ones(1, 9, 1)), metric, 2)
    assert len(calls) == 1

    with monkeypatch.context() as exporting:
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS

        exporting.setattr(GLOBALS, "in_onnx_export", True)  # what torch's TorchScript-based exporter sets
        bipartite_merge(TokenState(x), metric, 2)  # an ONNX export must record the general ops
        assert len(calls) == 1 and not cpu_kernels.kernel_eligible(x, None)
    bipartite_merge(TokenState(x), metric, 2)
    assert len(calls) == 2

    cpu_kernels.set_cpu_kernels("off")
    bipartite_merge(TokenState(x), metric, 2)
    assert len(calls) == 2


def test_failed_build_falls_back_with_one_warning_in_auto_and_raises_when_on(kernel_state, monkeypatch):
    def broken_build():
        raise OSError("no compiler")

    monkeypatch.setattr(cpu_kernels, "_build", broken_build)
    cpu_kernels._mode, cpu_kernels._module, cpu_kernels._failure = "auto", None, None
    state, metric = TokenState(X, num_prefix=1), METRIC
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = bipartite_merge(state, metric, 1)
        again = bipartite_merge(state, metric, 1)
    assert [str(w.message).count("no compiler") for w in caught] == [1]  # one warning, not one per merge
    assert out.x.flatten().tolist() == again.x.flatten().tolist() == [10.0, 8.0, 1.0, 3.0]  # the Python path
    with pytest.raises(RuntimeError, match="could not be built"):
        cpu_kernels.set_cpu_kernels("on")


def test_kernels_give_the_same_results_on_one_thread_and_on_two(fused):
    """The kernels split a batch's images across torch's intra-op threads (OpenMP); images are independent,
    so the thread count changes nothing."""
    from tokenreduce.ops.unmerge import window_groups

    generator = torch.Generator().manual_seed(5)
    x, metric = torch.randn(9, 41, 24, generator=generator), torch.randn(9, 41, 8, generator=generator)
    grid_x = torch.randn(9, 65, 24, generator=generator)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            with torch.inference_mode():
                merged = cpu_kernels.fused_bipartite_merge(x, None, metric, 13, 1)
                groups = window_groups(grid_x, 20, 1, (8, 8), 2)
                means = groups.merge(grid_x)
                results.append([*merged, groups.slot, means, groups.unmerge_add(grid_x, means)])
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results, strict=True):
        assert torch.equal(one, two)


def test_the_build_uses_openmp_on_linux_and_falls_back_to_one_thread(kernel_state, monkeypatch):
    import sys

    name, cflags, ldflags = cpu_kernels.build_options(openmp=True)
    serial_name, serial_cflags, serial_ldflags = cpu_kernels.build_options(openmp=False)
    assert "-fopenmp" not in serial_cflags and serial_ldflags == []
    if not sys.platform.startswith("linux"):
        assert (name, cflags) == (serial_name, serial_cflags)
        return
    assert "-fopenmp" in cflags and ldflags == ["-fopenmp"] and "_serial" in serial_name and name != serial_name
    loads = []

    def load(cpp_extension, name, cflags, ldflags):
        loads.append(name)
        if "-fopenmp" in cflags:
            raise RuntimeError("unrecognized command-line option '-fopenmp'")
        return "serial module"

    monkeypatch.setattr(cpu_kernels, "_load", load)
    assert cpu_kernels._build() == "serial module"
    assert loads == [name, serial_name]


def test_mode_comes_from_the_environment_and_bad_values_are_refused(kernel_state, monkeypatch):
    monkeypatch.setenv(cpu_kernels.ENV_VAR, "OFF")
    cpu_kernels._mode = None
    assert cpu_kernels.cpu_kernels_mode() == "off"
    assert cpu_kernels.load_cpu_kernels() is None
    monkeypatch.setenv(cpu_kernels.ENV_VAR, "fast")
    cpu_kernels._mode = None
    with pytest.raises(ValueError, match="TOKENREDUCE_CPU_KERNELS"):
        cpu_kernels.cpu_kernels_mode()
    for bad in ("yes", True, None):
        with pytest.raises(ValueError, match="auto, on, off"):
            cpu_kernels.set_cpu_kernels(bad)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:.*torch.jit.trace.*:FutureWarning")
def test_jit_trace_sees_the_python_path(fused):
    model = tr.apply(make_vit(), "tome", r=4)
    first, second = torch.randn(2, 2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        traced = torch.jit.trace(model, first, check_trace=False)
        torch.testing.assert_close(traced(second), model(second), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("strict", [True, False])
def test_torch_export_sees_the_python_path(fused, strict):
    # Frozen weights: nothing needs autograd, so only the export guard keeps the kernel out.
    model = tr.apply(make_vit(), "tome", r=4).requires_grad_(False)
    first, second = torch.randn(2, 2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    exported = torch.export.export(model, (first,), strict=strict)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(second), model(second), atol=1e-5, rtol=1e-5)


def test_a_stale_build_lock_of_an_older_torch_is_removed_and_a_fresh_one_kept(tmp_path, caplog):
    """torch's FileBaton waits while its lock file exists: one left by a killed build would hang every later
    process. The loader removes such a lock once it is older than any build; a newer torch's FileLock file
    (an advisory lock that dies with its holder) is never touched."""
    import os
    import time
    import types

    def fake(kind: str) -> types.ModuleType:
        module = types.ModuleType(f"fake_cpp_extension_{kind}")
        setattr(module, kind, object)
        module._get_build_directory = lambda name, verbose=False: str(tmp_path / name)
        return module

    lock = tmp_path / "ext" / "lock"
    lock.parent.mkdir()
    lock.touch()
    assert not cpu_kernels.clear_stale_build_lock(fake("FileBaton"), "ext")  # fresh: maybe a build in progress
    assert lock.exists()
    old = time.time() - cpu_kernels.STALE_LOCK_SECONDS - 5
    os.utime(lock, (old, old))
    assert not cpu_kernels.clear_stale_build_lock(fake("FileLock"), "ext") and lock.exists()
    with caplog.at_level("WARNING", logger=cpu_kernels.logger.name):
        assert cpu_kernels.clear_stale_build_lock(fake("FileBaton"), "ext")
    assert not lock.exists() and "interrupted build" in caplog.text
    assert not cpu_kernels.clear_stale_build_lock(fake("FileBaton"), "ext")  # no lock: nothing to do
