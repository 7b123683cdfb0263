"""The segmenter trainers end to end on a few real Fashion-MNIST items: the reference segmenter's recipe and
Cropr's end-to-end segmentation fine-tune write what the evaluation loads."""

from __future__ import annotations

import pytest
import torch
from conftest import write_fashion_mnist

import tokenreduce as tr
from tokenreduce.checkpoint import read_reducer
from tokenreduce.dense import evaluate as dense_evaluate
from tokenreduce.dense.mosaic import mosaic_testset
from tokenreduce.dense.segmenter import load_reference_segmenter
from tokenreduce.models.reference import load_reference_testset
from tokenreduce.training import segmentation


@pytest.fixture
def small_mosaic_run(tmp_path, monkeypatch):
    """64 bundled test items written as a "train" split (4 steps of 4 canvases), 16 evaluation canvases."""
    images, labels = load_reference_testset(limit=64)
    write_fashion_mnist(tmp_path, "train", images, labels)
    monkeypatch.setattr(segmentation, "mosaic_testset", lambda: mosaic_testset(limit=16))
    return tmp_path


def test_reference_then_cropr_segmenter_training_write_what_evaluation_loads(small_mosaic_run):
    data = small_mosaic_run
    common = dict(epochs=1, canvases_per_batch=4, eval_canvases=8, compile=False, threads=None, progress=False)
    info = segmentation.train_reference_segmenter(str(data), str(data / "seg"), **common)
    assert info["complete"] and info["training"]["steps"] == 4 and info["eval"]["canvases"] == 16
    assert [e["epoch"] for e in info["training"]["per_epoch_eval"]] == [1]
    weights = data / "seg" / segmentation.WEIGHTS_FILE
    canvas, target = mosaic_testset(limit=16)
    scored = segmentation.evaluate_segmenter(load_reference_segmenter(weights), canvas, target)
    assert scored["miou"] == pytest.approx(info["eval"]["miou"], abs=1e-6)  # the exported weights are the scored ones

    # a subpixel decoder continues from the bilinear segmenter; its JSON tells the loader which decoder it has
    sub = segmentation.train_reference_segmenter(str(data), str(data / "sub"), init=str(weights),
                                                 decoder="subpixel", **common)
    assert sub["complete"] and sub["decoder"] == "subpixel"
    previous = sub["training"]["previous_phase"]  # the run it continued, as that run's JSON recorded it
    assert previous["decoder"] == "bilinear" and previous["steps"] == 4 and previous["eval"] == info["eval"]
    loaded = load_reference_segmenter(data / "sub" / segmentation.WEIGHTS_FILE)
    assert loaded.decoder == "subpixel" and loaded.head.out_features == 11 * 16
    scored = segmentation.evaluate_segmenter(loaded, canvas, target)
    assert scored["miou"] == pytest.approx(sub["eval"]["miou"], abs=1e-6)

    summary = segmentation.train_cropr_segmenter(str(weights), str(data), str(data / "cropr"), **common)
    assert summary["complete"] and summary["steps"] == 4
    assert summary["params"]["aux"] == "segmentation" and summary["params"]["num_queries"] == 196
    reducer_file = data / "cropr" / f"{segmentation.CROPR_REDUCER}.safetensors"
    assert dense_evaluate.companion_weights(reducer_file) == data / "cropr" / segmentation.CROPR_WEIGHTS_FILE
    model = load_reference_segmenter(data / "cropr" / segmentation.CROPR_WEIGHTS_FILE)
    tr.apply(model.backbone, "cropr", checkpoint=str(reducer_file), restore="frozen")
    assert tr.reducer(model.backbone).config() == summary["params"]
    with torch.no_grad():
        masks = model(segmentation.preprocess_canvas(canvas[:2])).argmax(1)
    assert masks.shape == (2, 56, 56)
    assert tr.stats(model.backbone).gmacs <= 0.6 * tr.stats(model.backbone).gmacs_unreduced + 1e-9

    # a continuation starts from the trained reducer (not fresh queries) and keeps the first run's record
    again = segmentation.train_cropr_segmenter(
        str(data / "cropr" / segmentation.CROPR_WEIGHTS_FILE), str(data), str(data / "cropr2"),
        reducer_init=str(reducer_file), curriculum=0.0, lr=1e-9, **common)
    assert again["complete"] and again["previous_phase"]["steps"] == 4
    first = read_reducer(reducer_file)[1]
    second = read_reducer(data / "cropr2" / f"{segmentation.CROPR_REDUCER}.safetensors")[1]
    assert first.keys() == second.keys()
    for name, value in first.items():
        torch.testing.assert_close(second[name], value, atol=1e-4, rtol=0)  # 4 steps at the 1e-5 rate floor
