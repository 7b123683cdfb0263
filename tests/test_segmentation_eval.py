"""Segmentation evaluation: the ADE20k-layout reader, rows on a small segmenter, restoration under the decoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

import tokenreduce as tr
from tokenreduce.dense.ade import find_pairs, read_pair
from tokenreduce.dense.evaluate import (
    evaluate_segmentation_configs,
    format_segmentation_table,
    segmentation_configs,
)
from tokenreduce.dense.metrics import confusion_matrix, scores
from tokenreduce.dense.segmenter import LinearSegmenter
from tokenreduce.eval.accuracy import Config

SIDE, PATCH, CLASSES = 32, 4, 5


def small_segmenter(seed: int = 0) -> LinearSegmenter:
    torch.manual_seed(seed)
    backbone = VisionTransformer(img_size=SIDE, patch_size=PATCH, in_chans=1, num_classes=0, embed_dim=32, depth=12,
                                 num_heads=2)
    return LinearSegmenter(backbone, CLASSES).eval()


def synthetic(n: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, SIDE, SIDE, generator=gen), torch.randint(0, CLASSES, (n, SIDE, SIDE), generator=gen)


def test_decoder_refuses_a_reduced_grid_without_restore():
    model = small_segmenter()
    tr.apply(model.backbone, "tome", r=4)
    with pytest.raises(RuntimeError, match="restore"):
        model(torch.randn(2, 1, SIDE, SIDE))


def test_zero_reduction_with_restore_gives_the_unreduced_masks():
    model = small_segmenter()
    x = torch.randn(3, 1, SIDE, SIDE)
    with torch.no_grad():
        stock = model(x)
        for method, params in (("tome", {"r": 0}), ("evit", {"keep_rate": 1.0}), ("random", {"keep_rate": 1.0})):
            tr.apply(model.backbone, method, restore="frozen", **params)
            torch.testing.assert_close(model(x), stock, rtol=0, atol=1e-5)
    tr.remove(model.backbone)


def test_rows_match_a_direct_computation():
    model = small_segmenter()
    x, y = synthetic()
    configs = [Config(None), Config("tome", {"r": 3}), Config("evit", {}, 0.7), Config("dynamicvit", {})]
    rows = evaluate_segmentation_configs(
        model, configs, lambda: iter([(x[:7], list(y[:7])), (x[7:], list(y[7:]))]), timing_batch=x[:4],
        repeats=1, progress=False, seeds=1, bootstrap_rounds=50,
    )
    assert not tr.is_reduced(model.backbone)
    with torch.no_grad():
        pred = model(x).argmax(1)
        base = scores(confusion_matrix(pred, y, CLASSES))
        tr.apply(model.backbone, "tome", r=3, restore="frozen")
        tome = scores(confusion_matrix(model(x).argmax(1), y, CLASSES))
        tome_gmacs = tr.gmacs(model.backbone, "tome", r=3)
    tr.remove(model.backbone)
    unreduced, tome_row, evit_row, learned = rows
    assert unreduced["miou"] == pytest.approx(base.miou) and unreduced["images"] == 12
    assert unreduced["pixel_accuracy"] == pytest.approx(base.pixel_accuracy)
    assert tome_row["miou"] == pytest.approx(tome.miou)
    decoder = (SIDE // PATCH) ** 2 * 32 * CLASSES / 1e9
    assert tome_row["gmacs"] == pytest.approx(tome_gmacs + decoder) == pytest.approx(tome_row["gmacs_analytic"])
    assert evit_row["gmacs"] / evit_row["gmacs_unreduced"] <= 0.7
    assert "learned method" in learned["skipped"]
    assert tome_row["delta_miou"] == pytest.approx(tome.miou - base.miou)
    table = format_segmentation_table(rows)
    assert "tome" in table and "skipped" in table


def test_default_configs_list_every_method_at_the_budget():
    model = small_segmenter()
    labels = [c.label for c in segmentation_configs(model.backbone, (0.6,))]
    assert labels[0] == "unreduced"
    for name in tr.methods():
        assert any(label.startswith(name) for label in labels), name


def _write_pair(root, name, image, label, *, image_ext=".png"):
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image, mode="L").save(root / "images" / f"{name}{image_ext}")
    if label is not None:
        Image.fromarray(label, mode="L").save(root / "annotations" / f"{name}.png")


def test_ade_reader_and_its_errors(tmp_path):
    img = (np.arange(40 * 48) % 251).astype(np.uint8).reshape(40, 48)
    lab = np.zeros((40, 48), np.uint8)
    lab[:, :10] = 255
    lab[5, 5] = 3
    _write_pair(tmp_path, "a", img, lab)
    (pairs,) = [find_pairs(tmp_path)]
    x, y = read_pair(*pairs[0], channels=1, size=(32, 32), mean=(0.5,), std=(0.25,), num_classes=CLASSES)
    assert x.shape == (1, 32, 32) and y.shape == (40, 48) and int(y[5, 5]) == 3 and int(y[0, 0]) == 255
    bad = lab.copy()
    bad[0, 20] = 9
    _write_pair(tmp_path / "bad_label", "b", img, bad)
    with pytest.raises(ValueError, match="label 9 is outside the 5 classes"):
        read_pair(*find_pairs(tmp_path / "bad_label")[0], channels=1, size=(32, 32), mean=(0,), std=(1,),
                  num_classes=CLASSES)
    _write_pair(tmp_path / "size", "c", img, lab[:20])
    with pytest.raises(ValueError, match="annotation is 48×20"):
        read_pair(*find_pairs(tmp_path / "size")[0], channels=1, size=(32, 32), mean=(0,), std=(1,),
                  num_classes=CLASSES)
    _write_pair(tmp_path / "missing", "d", img, None)
    with pytest.raises(FileNotFoundError, match="has no annotation"):
        find_pairs(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="images/"):
        find_pairs(tmp_path / "nowhere")


@pytest.fixture(scope="module")
def segmenter_file(tmp_path_factory):
    """A randomly initialised reference-architecture segmenter written as a checkpoint (no JSON: default config)."""
    from safetensors.torch import save_file

    from tokenreduce.dense.segmenter import build_reference_segmenter

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("segmenter") / "segmenter.safetensors"
    save_file({k: v.contiguous() for k, v in build_reference_segmenter().state_dict().items()}, str(path))
    return path


def test_cli_evaluate_segmentation_on_mosaics_and_ade_folder(segmenter_file, tmp_path, capsys):
    import json

    from tokenreduce.cli import main
    from tokenreduce.dense.mosaic import mosaic_testset

    out = tmp_path / "seg.json"
    args = ["evaluate", "--task", "segmentation", "--checkpoint", str(segmenter_file), "--limit", "6",
            "--method", "tome", "evit", "--budget", "0.6", "--repeats", "1", "--no-progress"]
    assert main(args + ["--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["label"] for r in result["rows"]] == ["unreduced", "tome@0.6", "evit@0.6"]
    assert all(r["gmacs"] <= 0.6 * r["gmacs_unreduced"] + 1e-9 for r in result["rows"][1:])
    assert result["samples"] == 6 and "mIoU" in capsys.readouterr().out
    # the same canvases as an ADE20k-layout folder give the same scores (resizing 56 -> 56 is exact)
    canvas, target = mosaic_testset(limit=6)
    for i in range(6):
        _write_pair(tmp_path / "ade", f"{i:03d}", canvas[i].numpy(), target[i].numpy().astype(np.uint8))
    (tmp_path / "ade" / "images" / "zz_broken.png").write_bytes(b"not a png")
    (tmp_path / "ade" / "annotations" / "zz_broken.png").write_bytes(b"not a png")
    out2 = tmp_path / "ade.json"
    folder_args = [a if a != "6" else "7" for a in args]  # 6 pairs and the broken one (sorted last)
    assert main(folder_args + ["--data", str(tmp_path / "ade"), "--json", str(out2)]) == 0
    folder = json.loads(out2.read_text())
    assert folder["samples"] == 6 and len(folder["skipped_images"]) == 1
    for a, b in zip(result["rows"], folder["rows"], strict=True):
        assert a["miou"] == pytest.approx(b["miou"], abs=1e-6) and a["images"] == b["images"]


def test_cli_segmentation_errors(segmenter_file, tmp_path, capsys):
    from tokenreduce.cli import main

    assert main(["evaluate", "--task", "segmentation", "--model", "deit_tiny_patch16_224", "--no-progress"]) == 2
    assert "segmenter trained by the project" in capsys.readouterr().err
    assert main(["evaluate", "--task", "segmentation", "--checkpoint", str(segmenter_file), "--data",
                 str(tmp_path / "none"), "--no-progress", "--json", ""]) == 2
    assert "images/" in capsys.readouterr().err


def test_cli_sweep_segmentation_writes_miou_tables(segmenter_file, tmp_path):
    import csv

    from tokenreduce.cli import main

    out = tmp_path / "sweep"
    assert main(["sweep", "--task", "segmentation", "--checkpoint", str(segmenter_file), "--methods", "tome",
                 "--budgets", "0.7", "--limit", "4", "--repeats", "1", "--out", str(out), "--no-progress"]) == 0
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [r["label"] for r in rows] == ["unreduced", "tome@0.7"] and float(rows[1]["miou"]) >= 0
    assert (out / "miou_vs_gmacs.png").is_file()


def test_distributed_segmentation_gives_the_same_scores(segmenter_file, tmp_path):
    import json
    import os
    import subprocess
    import sys

    from conftest import free_port

    from tokenreduce.cli import main

    args = ["evaluate", "--task", "segmentation", "--checkpoint", str(segmenter_file), "--limit", "7",
            "--method", "tome", "--param", "r=8", "--batch-size", "3", "--repeats", "1", "--no-progress"]
    single = tmp_path / "one.json"
    assert main(args + ["--json", str(single)]) == 0
    two = tmp_path / "two.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", free_port(),
           "-m", "tokenreduce.cli", *args, "--json", str(two)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = json.loads(single.read_text()), json.loads(two.read_text())
    assert b["world_size"] == 2
    for x, y in zip(a["rows"], b["rows"], strict=True):
        assert x["images"] == y["images"] == 7
        assert x["miou"] == pytest.approx(y["miou"], abs=1e-12) and x["iou"] == pytest.approx(y["iou"], abs=1e-12)


def test_visualize_segmentation_draws_token_maps_and_masks(tmp_path, capsys):
    from tokenreduce.cli import main
    from tokenreduce.viz import render_mask

    out = tmp_path / "seg.png"
    assert main(["visualize", "--task", "segmentation", "--method", "evit", "--index", "2", "--out", str(out)]) == 0
    width, height = Image.open(out).size
    panels = 1 + 3 + 2  # input, EViT's three stages, prediction, truth
    assert width == panels * (56 * 4 + 4) - 4 and height == 56 * 4 + 14
    mask = np.array([[0, 3], [255, 3]])
    rgb = render_mask(mask)
    assert (rgb[0, 0] == 0).all() and (rgb[1, 0] == 255).all() and (rgb[0, 1] == rgb[1, 1]).all()
    assert main(["visualize", "--task", "segmentation", "--index", "99999", "--out", str(out), "--overwrite"]) == 2
    assert "outside the" in capsys.readouterr().err
    assert main(["visualize", "--method", "tome", "--out", str(tmp_path / "x.png")]) == 2
    assert "needs an IMAGE" in capsys.readouterr().err


def test_ppt_calibration_keeps_the_restore_mode():
    model = small_segmenter()
    x = torch.randn(4, 1, SIDE, SIDE)
    tr.apply(model.backbone, "ppt", restore="frozen")
    tr.calibrate(model.backbone, "ppt", x)
    assert tr.reducer(model.backbone).restore == "frozen"
    assert model(x).shape == (4, CLASSES, SIDE, SIDE)


def test_subpixel_decoder_puts_each_patch_logit_on_its_own_pixel():
    """Hand-worked layout: head output channel ``class·P·P + row·P + column`` of the token of patch (i, j) lands on
    pixel (i·P + row, j·P + column) of that class's map."""
    model = LinearSegmenter(small_segmenter().backbone, CLASSES, decoder="subpixel").eval()
    grid, pixels = SIDE // PATCH, PATCH * PATCH
    assert model.head.out_features == CLASSES * pixels
    dim = model.head.in_features
    tokens = torch.zeros(2, grid * grid, dim)
    tokens[:, :, 0] = torch.arange(grid * grid).float()  # feature 0 holds the token's index in the grid
    tokens[1] *= 2  # second image: twice the index
    model.patch_tokens = lambda images: tokens[: images.shape[0]]
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.weight[:, 0] = 1000.0
        model.head.bias.copy_(torch.arange(CLASSES * pixels).float())
        out = model(torch.zeros(2, 1, SIDE, SIDE))
    assert out.shape == (2, CLASSES, SIDE, SIDE)
    for b, k, y, x in ((0, 0, 0, 0), (0, 3, 5, 6), (1, 4, 31, 31), (1, 2, 9, 20), (0, 1, 30, 1)):
        i, r, j, c = y // PATCH, y % PATCH, x // PATCH, x % PATCH
        expected = 1000.0 * (b + 1) * (i * grid + j) + k * pixels + r * PATCH + c
        assert out[b, k, y, x].item() == expected


def test_a_bilinear_head_starts_a_subpixel_decoder_as_nearest_upsampling(tmp_path):
    import torch.nn.functional as F
    from safetensors.torch import save_file

    from tokenreduce.dense.segmenter import load_segmenter_weights

    bilinear = small_segmenter(seed=1)
    path = tmp_path / "seg.safetensors"
    save_file({k: v.contiguous() for k, v in bilinear.state_dict().items()}, str(path))
    subpixel = LinearSegmenter(small_segmenter(seed=2).backbone, CLASSES, decoder="subpixel").eval()
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_segmenter_weights(subpixel, path)  # a head of another shape is refused unless converted
    load_segmenter_weights(subpixel, path, convert_decoder=True)
    x = torch.randn(2, 1, SIDE, SIDE)
    with torch.no_grad():
        expected = F.interpolate(bilinear.patch_logits(x), scale_factor=PATCH, mode="nearest")
        torch.testing.assert_close(subpixel(x), expected, rtol=0, atol=1e-5)


def test_segmenter_refuses_an_unknown_decoder():
    with pytest.raises(ValueError, match="decoder"):
        LinearSegmenter(small_segmenter().backbone, CLASSES, decoder="bicubic")


def test_subpixel_decoder_with_restore_at_zero_reduction_equals_unreduced():
    model = LinearSegmenter(small_segmenter().backbone, CLASSES, decoder="subpixel").eval()
    x = torch.randn(2, 1, SIDE, SIDE)
    with torch.no_grad():
        stock = model(x)
        tr.apply(model.backbone, "tome", r=0, restore="frozen")
        torch.testing.assert_close(model(x), stock, rtol=0, atol=1e-5)
