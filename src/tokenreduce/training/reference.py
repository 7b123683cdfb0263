"""Training recipe of the bundled reference model (``python scripts/train_reference.py``).

Reads the original Fashion-MNIST idx files (Debian: ``apt-get install
dataset-fashion-mnist`` → ``/usr/share/datasets/fashion-mnist``), trains the
reference ViT with :func:`tokenreduce.training.train`, evaluates on the 10k test set
after every epoch, and exports the weights (safetensors) and a JSON with the
configuration, provenance, licence, command and accuracy.
"""

from __future__ import annotations

import contextlib
import functools
import json
import platform
import shlex
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from ..models.reference import (
    INFO_FILE,
    MEAN,
    REFERENCE_CONFIG,
    STD,
    WEIGHTS_FILE,
    augment,
    build_reference_model,
    load_fashion_mnist,
    preprocess,
)
from ..threads import set_threads
from .engine import TrainConfig, precision_label, train
from .tasks import ClassificationTask

DEFAULT_DATA = "/usr/share/datasets/fashion-mnist"

PROVENANCE = {
    "dataset": "Fashion-MNIST (Xiao, Rasul & Vollgraf 2017, arXiv:1708.07747)",
    "dataset_copyright": "Copyright (c) 2017 Zalando SE",
    "dataset_licence": "MIT",
    "dataset_source": "Debian package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist), "
    "identical to https://github.com/zalandoresearch/fashion-mnist",
    "weights_licence": "MIT (trained by the tokenreduce project from random initialisation)",
}


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy of ``model`` on uint8 ``images`` N×28×28 with ``labels`` N."""
    correct = 0
    for i in range(0, len(images), batch_size):
        logits = model(preprocess(images[i : i + batch_size]))
        correct += (logits.argmax(-1) == labels[i : i + batch_size]).sum().item()
    return correct / len(images)


def train_reference(
    data_dir: str = DEFAULT_DATA,
    out_dir: str = "runs/reference",
    *,
    epochs: int = 32,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 0.05,
    warmup_epochs: float = 1.0,
    label_smoothing: float = 0.0,
    max_shift: int = 1,
    embed_dim: int | None = None,
    seed: int = 0,
    init: str | None = None,
    compile: bool = True,
    amp: bool = True,
    resume: bool = False,
    threads: int | None = 2,
    progress: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Train the reference model and export it to ``out_dir`` (weights + JSON).  Returns the JSON.

    ``init``: start from these weights (safetensors) instead of a random initialisation — a
    second training phase; the first phase's JSON (``reference_vit.json`` next to it) is
    recorded under ``training.previous`` and its architecture is kept.  ``embed_dim``: width
    (default :data:`REFERENCE_CONFIG`'s; heads stay at 4).  ``amp``: bf16 autocast for the
    training forward/backward (weights and optimizer state stay fp32; the per-epoch test
    accuracy is measured in fp32).

    The attention of the blocks runs unfused (explicit ``q @ k.T``, softmax, ``@ v``) while
    training: for 16-wide heads on 65 tokens it trains faster on CPU than fused SDPA (see
    ``benchmarks/train_speed.py``); the exported model uses fused attention.
    """
    if threads:
        set_threads(threads)
    train_x, train_y = load_fashion_mnist(data_dir, "train")
    test_x, test_y = load_fashion_mnist(data_dir, "t10k")
    torch.manual_seed(seed)
    config = dict(REFERENCE_CONFIG)
    if embed_dim is not None:
        config["embed_dim"] = embed_dim
    previous = None
    if init is not None:
        info_path = Path(init).with_name(INFO_FILE)
        if info_path.is_file():
            init_info = json.loads(info_path.read_text())
            previous = init_info["training"]
            config.update(init_info.get("config", {}))
        else:
            previous = {"weights": init}
    model = build_reference_model(config)
    if init is not None:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(init))
    steps_per_epoch = len(train_x) // batch_size
    train_config = TrainConfig(
        out_dir=out_dir,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        warmup_steps=round(warmup_epochs * steps_per_epoch),
        seed=seed,
        checkpoint_every=200,
        log_every=20,
        resume=resume,
        compile=compile,
        amp=amp,
        progress=progress,
    )
    task = ClassificationTask(
        transform=functools.partial(augment, max_shift=max_shift), label_smoothing=label_smoothing
    )
    with unfused_attention(model):
        result = train(
            model,
            task,
            TensorDataset(train_x, train_y),
            train_config,
            evaluate=lambda m: {"test_top1": accuracy(m, test_x, test_y)},
        )
    top1 = accuracy(model.eval(), test_x, test_y)
    out = Path(out_dir)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / WEIGHTS_FILE))
    info = {
        "model": "timm.models.vision_transformer.VisionTransformer",
        "config": config,
        "preprocessing": {"pad": "28x28 zero-padded by 2 to 32x32", "mean": MEAN, "std": STD},
        "test_top1": top1,
        "test_samples": len(test_x),
        "training": {
            "command": command or "scripts/train_reference.py",
            "epochs": epochs,
            "steps": result.step,
            "batch_size": batch_size,
            "optimizer": f"AdamW lr={lr} wd={weight_decay} (not on pos_embed, cls_token, biases, norms), "
            f"{warmup_epochs} epoch warm-up, cosine to 1e-5, grad clip 1.0",
            "label_smoothing": label_smoothing,
            "precision": precision_label(amp),
            "augmentation": f"horizontal flip, random translation up to {max_shift} px",
            "seed": seed,
            "wall_time_s": round(result.wall_time_s, 1),
            "total_wall_time_s": round(result.wall_time_s + _total_wall(previous), 1),
            "previous": previous,
            "per_epoch_test_top1": [e["test_top1"] for e in result.evals],
            "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        },
        **PROVENANCE,
    }
    (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


def reference_augmentation(max_shift: int = 1) -> Callable[[Tensor], Tensor]:
    """The batch augmentation the shipped reference model was trained with (:func:`augment`: random shifts up to
    ``max_shift`` px and horizontal flips; uint8 B×28×28 in, normalised B×1×32×32 out)."""
    return functools.partial(augment, max_shift=max_shift)


@contextlib.contextmanager
def unfused_attention(model: nn.Module) -> Iterator[None]:
    """Run every timm attention layer of ``model`` unfused inside the block; each layer's own setting after it."""
    layers = [m for m in model.modules() if hasattr(m, "fused_attn")]
    before = [m.fused_attn for m in layers]
    for m in layers:
        m.fused_attn = False
    try:
        yield
    finally:
        for m, fused in zip(layers, before, strict=True):
            m.fused_attn = fused


def _total_wall(previous: dict[str, Any] | None) -> float:
    """Wall time of the earlier phases recorded in ``previous`` (0 without one)."""
    if not previous:
        return 0.0
    return float(previous.get("total_wall_time_s", previous.get("wall_time_s", 0.0)))


def command_line() -> str:
    """The command that started this process, for the record."""
    return " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]])
