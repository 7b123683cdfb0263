"""Why class-attention pruning falls below random pruning on the bundled reference model.

On the Fashion-MNIST reference model, EViT (class-attention top-k) scores below random pruning at
the same GMACs, off the shelf and after a short fine-tune.  This script prints what the methods keep
and what they lose, at ``--budget`` (default 0.6) on the first ``--limit`` test images:

1. the unreduced model's class attention per foreground and per background patch, block by block
   (a patch is foreground when its mean intensity is above 0.1);
2. per method, after each reduction stage: patches still held as themselves (not pruned, fused or
   merged), the share of them that is foreground, and the shares of the foreground, of the
   background next to the item (the silhouette) and of the far background they keep;
3. per method, top-1 per class.

    python benchmarks/pruning_analysis.py                  # 2000 images, budget 0.6, about 1 minute
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import Tensor

import tokenreduce as tr
from tokenreduce.models.reference import load_reference_model, load_reference_testset, preprocess

CLASSES = ("T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
METHODS = (("random", {}), ("evit", {}), ("evit", {"fuse_token": False}), ("tps", {}), ("ppt", {}))


def foreground_patches(images: Tensor) -> Tensor:
    """B×64 bool: 4×4 patches of the zero-padded 32×32 image whose mean intensity is above 0.1."""
    pixels = torch.nn.functional.pad(images.float() / 255.0, (2, 2, 2, 2))
    return pixels.unfold(1, 4, 4).unfold(2, 4, 4).reshape(len(images), 64, 16).mean(-1) > 0.1


def class_attention(model: torch.nn.Module, x: Tensor) -> list[Tensor]:
    """Per block, the class token's attention to each patch, B×64 (mean over heads), unreduced model."""
    rows: list[Tensor] = []

    def hook(attn: torch.nn.Module, args: tuple[Tensor, ...], _out: Tensor) -> None:
        tokens = args[0]
        b, n, c = tokens.shape
        q, k, _ = attn.qkv(tokens).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
        rows.append(((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(-1).mean(1)[:, 0, 1:])

    handles = [block.attn.register_forward_hook(hook) for block in model.blocks]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=2000)
    parser.add_argument("--budget", type=float, default=0.6)
    args = parser.parse_args(argv)

    images, labels = load_reference_testset(limit=args.limit)
    x, foreground = preprocess(images), foreground_patches(images)
    model = load_reference_model().eval()
    print(f"# reference model, first {len(images)} test images, budget {args.budget}; "
          f"foreground patches: {foreground.float().mean():.2f} of 64")

    print("\nclass attention per patch, unreduced (block: foreground / background)")
    for i, row in enumerate(class_attention(model, x)):
        fg = (row * foreground).sum(1) / foreground.sum(1)
        bg = (row * ~foreground).sum(1) / (~foreground).sum(1).clamp_min(1)
        print(f"  block {i:2d}: {fg.mean():.4f} / {bg.mean():.4f}")

    with torch.no_grad():
        predictions = {"unreduced": model(x).argmax(1)}
    grid = foreground.view(-1, 1, 8, 8).float()
    near = torch.nn.functional.max_pool2d(grid, 3, 1, 1).view(-1, 64) > 0
    ring, far = near & ~foreground, ~near  # background patches touching the item, and the rest
    print("\npatches held as themselves after each stage: count of 64, foreground share; kept shares of the "
          "foreground, the background next to it, the far background")
    for method, params in METHODS:
        label = method + "".join(f" {k}={v}" for k, v in params.items())
        tr.apply(model, method, budget=args.budget, trace_source=True, **params)
        with torch.no_grad():
            predictions[label] = model(x).argmax(1)
        stages = []
        for stage, source in tr.last_forward(model).stages:  # B×N×N0 live tokens' sources
            single = source.sum(-1) == 1
            kept = (source * single.unsqueeze(-1)).sum(1)[:, 1:] > 0  # B×64
            shares = ", ".join(f"{(kept & part).sum() / part.sum():.2f}" for part in (foreground, ring, far))
            stages.append(f"{stage}: {kept.float().sum(1).mean():4.1f}, {(kept & foreground).sum() / kept.sum():.2f}; "
                          f"{shares}")
        print(f"  {label:22s} " + " | ".join(stages))
        tr.remove(model)

    print("\ntop-1 per class")
    print(f"  {'':22s} {'all':>6} " + " ".join(f"{name[:7]:>7}" for name in CLASSES))
    for label, predicted in predictions.items():
        right = (predicted == labels).float()
        per_class = " ".join(f"{right[labels == c].mean():7.2f}" for c in range(len(CLASSES)))
        print(f"  {label:22s} {right.mean():6.4f} {per_class}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
