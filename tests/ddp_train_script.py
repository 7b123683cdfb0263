"""Run by tests/test_train_engine.py under torchrun: a tiny DDP training on 2 CPU processes (gloo)."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from test_train_engine import config, tiny_model, toy_data

from tokenreduce.training import ClassificationTask, train


def main(out: str) -> None:
    model = tiny_model()
    result = train(model, ClassificationTask(), toy_data(), config(out, epochs=1, batch_size=4))
    torch.save({"state": model.state_dict(), "steps": result.step}, f"{out}/rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    from pathlib import Path

    main(str(Path(sys.argv[1])))
