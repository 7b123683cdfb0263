"""Run by tests/test_learned_training.py under torchrun: reducer training on 2 CPU processes (gloo)."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from conftest import make_vit
from test_learned_training import _data

import tokenreduce as tr
from tokenreduce.training.learned import train_reducer


def main(out: str, method: str) -> None:
    model = make_vit()
    params = {"p": 4} if method == "cropr" else {}
    result = train_reducer(model, method, _data(), out_dir=out, batch_size=8, epochs=1, lr=0.05, progress=False,
                           **params)
    state = tr.reducer(model).module.state_dict()
    torch.save({"state": state, "steps": result["result"].step}, f"{out}/rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
