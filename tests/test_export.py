"""ONNX export (tr.export_onnx, ``tokenreduce export``) checked in ONNX Runtime, and pickling of reduced models.

The models are tiny random ViTs (3 blocks, 16 patches, width 32) so that each export takes a few seconds;
every method's reduction is at block 1 (LTMP: every block of a 2-block model).
"""

from __future__ import annotations

import copy
import io
from typing import Any

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import tokenreduce as tr
from tokenreduce import export as export_module
from tokenreduce.cli import main
from tokenreduce.export import OnnxExportError, ort_session, run_onnx

# Every method the library has, in a configuration for the 3-block model; learned ones untrained.
CASES: dict[str, dict[str, Any]] = {
    "tome": {"r": 3},
    "tomesd": {"r": 5},
    "evit": {"layers": (1,)},
    "random": {"layers": (1,)},
    "tps": {"layers": (1,)},
    "dtps": {"layers": (1,), "untrained": True},
    "bat": {"layers": (1,)},
    "dynamicvit": {"layers": (1,), "untrained": True},
    "cropr": {"p": 3, "untrained": True},
    "ppt": {"layers": (1,), "r": 4},
    "ltmp": {"merge_threshold": 0.4, "prune_threshold": 0.05, "untrained": True},
}


def tiny_vit(depth: int = 3) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=depth, num_heads=2, num_classes=10).eval()


def images(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def reduced(method: str) -> VisionTransformer:
    """The tiny ViT with ``method`` applied; learned parameters spread out so that no two scores nearly tie."""
    params = dict(CASES[method])
    name = "tps" if method == "dtps" else method
    if method == "dtps":
        params["variant"] = "dtps"
    # LTMP reduces in every block, each with a data-dependent row count: 2 blocks keep its export short
    model = tr.apply(tiny_vit(2 if method == "ltmp" else 3), name, **params)
    module = tr.reducer(model).module
    if module is not None and method != "ltmp":  # untrained predictors score every token almost alike
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * 0.5)
    return model


@pytest.fixture(scope="module", autouse=True)
def python_merges():
    """The plain PyTorch merge path for the eager references (no kernel build during the tests)."""
    tr.set_cpu_kernels("off")
    yield
    tr.set_cpu_kernels("auto")


@pytest.mark.parametrize("method", sorted(CASES))
def test_exported_model_matches_pytorch(method: str, tmp_path) -> None:
    model = reduced(method)
    x = images(4, seed=2)
    if method == "ppt":  # a threshold between the images' score variances: a batch that both pools and prunes
        ppt = tr.reducer(model)
        ppt.start_recording()
        with torch.no_grad():
            model(x)
        variances = ppt.stop_recording()[1].sort().values
        tr.apply(model, "ppt", **{**CASES["ppt"], "threshold": float(variances[1:3].mean())})
    path = tmp_path / f"{method}.onnx"
    result = tr.export_onnx(model, path, example=x)
    assert path.is_file() and result.path == path and result.method == tr.reducer(model).name
    assert set(result.max_abs_diff) == {4, 1} and max(result.max_abs_diff.values()) <= 1e-4
    assert result.dynamic_batch and result.input_shape == (4, 3, 32, 32)

    # a batch size the graph was not traced with, run here directly
    y = images(5, seed=3)
    with torch.no_grad():
        expected = model(y).numpy()
    (got,) = run_onnx(ort_session(path), y)
    assert got.shape == (5, 10)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    if method == "ltmp":  # the padded form: the images keep different numbers of tokens
        counts = [out for _, out in tr.last_forward(model).block_tokens if isinstance(out, torch.Tensor)]
        assert counts and all(len(set(c.tolist())) > 1 for c in counts)
    if method == "ppt":
        ppt = tr.reducer(model)
        ppt.start_recording()
        with torch.no_grad():
            model(x)
        pooled = ppt.stop_recording()[1] < ppt.thresholds[1]
        assert 0 < int(pooled.sum()) < len(pooled)


def test_fixed_schedule_methods_export_static_token_counts() -> None:
    assert set(export_module.FIXED_SCHEDULE) | {"ppt", "ltmp"} == set(tr.methods())
    assert "select" in export_module.export_form("ppt") and "padded" in export_module.export_form("ltmp")


def test_refuses_a_model_in_training_mode(tmp_path) -> None:
    model = reduced("tome").train()
    with pytest.raises(ValueError, match="eval mode"):
        tr.export_onnx(model, tmp_path / "m.onnx")
    assert not any(tmp_path.iterdir())


def test_refuses_and_writes_nothing_when_onnx_runtime_disagrees(tmp_path, monkeypatch) -> None:
    real = export_module.run_onnx
    monkeypatch.setattr(export_module, "run_onnx", lambda session, x: [out + 1e-3 for out in real(session, x)])
    target = tmp_path / "m.onnx"
    target.write_bytes(b"an earlier export")
    with pytest.raises(OnnxExportError, match=r"does not reproduce PyTorch .*0.001 at batch 2.*nothing was written"):
        tr.export_onnx(tiny_vit(), target, (2, 3, 32, 32))
    assert target.read_bytes() == b"an earlier export"  # the earlier file is kept, and no staging folder is left
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


class DataDependent(torch.nn.Module):
    """A model whose control flow depends on the pixel values: no graph can hold it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.sum() > 0 else x


def test_a_model_that_cannot_be_traced_is_refused_with_the_reason(tmp_path) -> None:
    with pytest.raises(OnnxExportError, match=r"the unreduced model could not be exported to ONNX: \w+"):
        tr.export_onnx(DataDependent().eval(), tmp_path / "m.onnx", (2, 3, 4, 4))
    assert not (tmp_path / "m.onnx").exists()


def test_cli_export(tmp_path, capsys) -> None:
    out = tmp_path / "random.onnx"
    argv = ["export", "--format", "onnx", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--model-kwargs",
            "patch_size=8", "depth=3", "embed_dim=32", "num_heads=2", "num_classes=10", "--method", "random",
            "--param", "layers=1,", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "dynamic batch" in printed and "max |difference|" in printed
    (logits,) = run_onnx(ort_session(out), images(3, seed=4))
    assert logits.shape == (3, 10)
    assert main([*argv[:-1], str(tmp_path / "random.txt")]) == 2
    assert "must end in .onnx" in capsys.readouterr().err


# -- pickling --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(CASES))
def test_torch_save_round_trip_restores_the_reduction(method: str) -> None:
    model = reduced(method)
    x = images(3, seed=5)
    with torch.no_grad():
        expected = model(x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert tr.is_reduced(loaded) and tr.reducer(loaded).config() == tr.reducer(model).config()
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    assert tr.stats(loaded).method == tr.reducer(model).name
    tr.remove(loaded)
    assert type(loaded) is VisionTransformer and all(type(b).__name__ == "Block" for b in loaded.blocks)


@pytest.mark.parametrize("method", ["tome", "dynamicvit"])
def test_deepcopy_of_a_reduced_model(method: str) -> None:
    model = reduced(method)
    x = images(2, seed=6)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(clone(x), model(x))
    assert tr.reducer(clone) is not tr.reducer(model)
    assert all(a is not b for a, b in zip(clone.parameters(), model.parameters(), strict=True))
    if tr.reducer(model).module is not None:  # the learned parameters are copied, not shared
        with torch.no_grad():
            before = model(x)
            for p in tr.reducer(clone).module.parameters():
                p.zero_()
            assert torch.equal(model(x), before)
    tr.remove(clone)
    assert tr.is_reduced(model) and not tr.is_reduced(clone)


@pytest.mark.parametrize("flag", ["torchscript", "dynamo"])
def test_tracing_sees_an_onnx_export_as_torch_does(monkeypatch, flag):
    """``tracing()`` reads torch's two ONNX-export flags directly (its public check re-imports them on every
    call); it must agree with ``torch.onnx.is_in_onnx_export`` whichever flag an exporter sets."""
    from torch.onnx._internal.exporter import _flags
    from torch.onnx._internal.torchscript_exporter._globals import GLOBALS

    from tokenreduce.ops import modes

    assert not modes.tracing() and not torch.onnx.is_in_onnx_export()
    if flag == "torchscript":
        monkeypatch.setattr(GLOBALS, "in_onnx_export", True)
    else:
        monkeypatch.setattr(_flags, "_is_onnx_exporting", True)
    assert torch.onnx.is_in_onnx_export() and modes.tracing()


def test_tracing_falls_back_to_torchs_check_where_it_reads_other_names(monkeypatch):
    from tokenreduce.ops import modes

    calls = []

    def public() -> bool:  # a torch whose check is not the two flags
        calls.append(1)
        return True

    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", public)
    monkeypatch.setattr(modes, "_onnx_check", None)
    assert modes.tracing() and calls == [1]
