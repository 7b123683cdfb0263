"""Run by tests/test_recipes.py under torchrun: a recipe fine-tune on 2 CPU processes (gloo)."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from test_recipes import ddp_run


def main(out: str) -> None:
    state = ddp_run(out, batch_size=4)
    torch.save(state, f"{out}/rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
