"""Reading images for a Hugging Face model: its image processor's settings (``preprocessor_config.json`` beside the
weights) become a timm data config, checked against the processor's own pixels; the image-folder commands run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from hf_convert import GEOMETRY, NUM_CLASSES, small_config_model
from PIL import Image
from timm.data import create_transform

from tokenreduce.models import timm_data_config
from tokenreduce.models.hf import processor_data_config
from tokenreduce.models.loading import load_model

SIZE = GEOMETRY["img_size"]


def saved(tmp_path, name: str, processor) -> str:
    folder = tmp_path / name
    small_config_model(name).save_pretrained(folder)
    processor.save_pretrained(folder)
    return f"hf:{folder}"


@pytest.mark.parametrize("name,processor", [
    ("ViTForImageClassification", transformers.ViTImageProcessor(size={"height": SIZE, "width": SIZE})),
    ("CLIPVisionModel", transformers.CLIPImageProcessor(size={"shortest_edge": SIZE + 8},
                                                        crop_size={"height": SIZE, "width": SIZE})),
    ("SiglipVisionModel", transformers.SiglipImageProcessor(size={"height": SIZE, "width": SIZE})),
])
def test_the_data_config_gives_the_processors_pixels(tmp_path, name, processor):
    model = load_model(saved(tmp_path, name, processor))
    config = timm_data_config(model)
    transform = create_transform(**config, is_training=False)
    rng = np.random.default_rng(0)
    side = processor.size.get("shortest_edge", SIZE)  # the size the processor resizes to: no resampling
    at_size = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
    theirs = processor(at_size, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(transform(at_size), theirs, atol=1e-6, rtol=0)  # rescale and normalise alike
    other = Image.fromarray(rng.integers(0, 256, (SIZE + 30, SIZE + 11, 3), dtype=np.uint8))
    mine, theirs = transform(other), processor(other, return_tensors="pt")["pixel_values"][0]
    assert mine.shape == theirs.shape == (3, SIZE, SIZE)
    one_level = 1 / 255 / min(processor.image_std)
    assert (mine - theirs).abs().mean() < one_level  # resizing rounds a pixel level apart at most here and there


def test_settings_timm_cannot_follow_are_refused_by_name(tmp_path):
    base = transformers.ViTImageProcessor(size={"height": SIZE, "width": SIZE}).to_dict()
    assert processor_data_config(base, (3, SIZE, SIZE))["crop_mode"] == "squash"
    with pytest.raises(ValueError, match="do_resize"):
        processor_data_config({**base, "do_resize": False}, (3, SIZE, SIZE))
    with pytest.raises(ValueError, match="rescale"):
        processor_data_config({**base, "rescale_factor": 1 / 127.5}, (3, SIZE, SIZE))
    with pytest.raises(ValueError, match=f"{SIZE + 1}×{SIZE + 1} images but the model takes {SIZE}×{SIZE}"):
        processor_data_config({**base, "size": {"height": SIZE + 1, "width": SIZE + 1}}, (3, SIZE, SIZE))
    with pytest.raises(ValueError, match="shortest edge without a centre crop"):
        processor_data_config({**base, "size": {"shortest_edge": SIZE}}, (3, SIZE, SIZE))
    folder = tmp_path / "bare"
    small_config_model("ViTForImageClassification").save_pretrained(folder)
    with pytest.raises(ValueError, match="preprocessor_config.json"):
        timm_data_config(load_model(f"hf:{folder}"))


def test_evaluate_and_visualize_read_an_image_folder_for_an_hf_model(tmp_path, capsys):
    from tokenreduce.cli import main

    model = saved(tmp_path, "ViTForImageClassification", transformers.ViTImageProcessor(
        size={"height": SIZE, "width": SIZE}))
    for label in range(NUM_CLASSES):  # one folder per class the model predicts
        (tmp_path / "data" / str(label)).mkdir(parents=True)
        Image.fromarray(np.full((40, 50, 3), 20 * label, dtype=np.uint8)).save(tmp_path / "data" / str(label) / "a.png")
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--model", model, "--data-dir", str(tmp_path / "data"), "--method", "tome",
                 "--param", "r=2", "--json", str(out), "--no-progress", "--overwrite"]) == 0
    rows = {row["label"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["unreduced"]["samples"] == NUM_CLASSES and rows["tome(r=2)"]["gmacs"] < rows["unreduced"]["gmacs"]
    assert main(["visualize", str(tmp_path / "data" / "0" / "a.png"), "--model", model, "--method", "tome",
                 "--param", "r=2", "--out", str(tmp_path / "t.png")]) == 0
    assert (tmp_path / "t.png").is_file()
