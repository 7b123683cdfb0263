"""The bundled reference model and test set: shipped, loadable, trained (>= 90% top-1), documented."""

from __future__ import annotations

import hashlib

import pytest
import torch
from conftest import write_fashion_mnist
from timm.models.vision_transformer import VisionTransformer

import tokenreduce as tr
from tokenreduce.models.reference import (
    CLASSES,
    INFO_FILE,
    WEIGHTS_FILE,
    augment,
    build_reference_model,
    data_path,
    load_reference_model,
    load_reference_testset,
    preprocess,
    reference_info,
)
from tokenreduce.training.reference import accuracy

CI_IMAGES = 500  # the full 10k number is in reference_vit.json and the README


def test_test_set_is_bundled_and_intact():
    images, labels = load_reference_testset()
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10000,) and set(labels.tolist()) == set(range(10)) and len(CLASSES) == 10
    assert torch.bincount(labels).tolist() == [1000] * 10
    digest = hashlib.sha256(data_path("t10k-labels-idx1-ubyte.gz").read_bytes()).hexdigest()
    assert digest == "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05"  # the original file
    assert "Zalando" in data_path("LICENSE-fashion-mnist.txt").read_text()


def test_checkpoint_is_small_and_the_model_is_a_12_block_timm_vit():
    assert data_path(WEIGHTS_FILE).stat().st_size < 10 * 2**20
    model = load_reference_model()
    assert type(model) is VisionTransformer and not model.training
    assert len(model.blocks) >= 12 and model.patch_embed.num_patches >= 64
    assert model.num_classes == 10


# The shipped checkpoint scores 90.83% on the full test set (91.4% on this subset); the tests hold it to the
# project's 90% target.
CLAIMED_TOP1 = 0.90


def test_shipped_checkpoint_scores_what_the_readme_claims():
    model = load_reference_model()
    images, labels = load_reference_testset(limit=CI_IMAGES)
    assert accuracy(model, images, labels) >= CLAIMED_TOP1


def test_metadata_records_provenance_command_and_accuracy():
    info = reference_info()
    assert data_path(INFO_FILE).is_file()
    assert info["test_top1"] >= CLAIMED_TOP1 and info["test_samples"] == 10000
    assert info["dataset_licence"] == "MIT" and "Zalando" in info["dataset_copyright"]
    assert "tokenreduce train-reference" in info["training"]["command"]
    assert info["training"]["wall_time_s"] > 0 and "seed" in info["training"]
    assert info["config"]["depth"] >= 12


def test_methods_run_on_the_reference_model():
    model = load_reference_model()
    x = preprocess(load_reference_testset(limit=8)[0])
    tr.apply(model, "tome", r=4)
    assert model(x).shape == (8, 10)
    assert tr.stats(model).gmacs == pytest.approx(tr.gmacs(model, "tome", r=4))
    tr.remove(model)


def test_preprocessing_and_augmentation_frame_images_alike():
    images = load_reference_testset(limit=16)[0]
    x = preprocess(images)
    assert x.shape == (16, 1, 32, 32)
    assert torch.allclose(x[:, :, :2], x.min())  # zero padding → the normalised black level
    gen = torch.Generator().manual_seed(0)
    a = augment(images, max_shift=0, generator=gen)
    ref = torch.Generator().manual_seed(0)  # replay augment's draws: two shifts (0 here), then the flip
    torch.randint(0, 1, (16,), generator=ref), torch.randint(0, 1, (16,), generator=ref)
    flipped = torch.rand(16, generator=ref) < 0.5
    expected = torch.where(flipped[:, None, None, None], x.flip(-1), x)
    torch.testing.assert_close(a, expected)


def test_train_reference_exports_a_checkpoint_that_loads_with_its_recorded_width(tmp_path):
    """The training recipe end to end on a few synthetic idx images: weights + JSON written, the
    JSON records the width actually trained, and ``load_reference_model`` rebuilds that width."""
    from tokenreduce.training.reference import train_reference

    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(64) % 10
    images = (torch.rand(64, 28, 28, generator=gen) * 60 + labels.view(-1, 1, 1) * 19).to(torch.uint8)
    write_fashion_mnist(tmp_path, "train", images, labels)
    write_fashion_mnist(tmp_path, "t10k", images[:20], labels[:20])
    info = train_reference(
        str(tmp_path), str(tmp_path / "run"), epochs=1, batch_size=32, embed_dim=32, label_smoothing=0.0,
        max_shift=1, compile=False, progress=False, threads=None,
    )
    assert info["config"]["embed_dim"] == 32 and info["training"]["steps"] == 2
    assert info["training"]["label_smoothing"] == 0.0 and "up to 1 px" in info["training"]["augmentation"]
    assert info["training"]["precision"].startswith("bf16")
    model = load_reference_model(tmp_path / "run" / WEIGHTS_FILE)
    assert model.embed_dim == 32 and len(model.blocks) == 12
    assert accuracy(model, images[:20], labels[:20]) == info["test_top1"]


def test_unfused_training_attention_matches_fused_and_is_switched_back():
    """Training runs timm's attention unfused for speed; both paths give the same output and each
    layer gets its own setting back afterwards."""
    from tokenreduce.training.reference import unfused_attention

    model = build_reference_model().eval()
    model.blocks[3].attn.fused_attn = False  # a layer already unfused stays so
    x = torch.randn(3, 1, 32, 32)
    fused = model(x)
    with unfused_attention(model):
        assert not any(blk.attn.fused_attn for blk in model.blocks)
        torch.testing.assert_close(model(x), fused, atol=1e-5, rtol=1e-4)
    assert [blk.attn.fused_attn for blk in model.blocks] == [i != 3 for i in range(12)]
