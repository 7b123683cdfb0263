"""Training learned reducers through the engine: GMACs move, resume is exact, checkpoints load."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_vit
from torch.utils.data import TensorDataset

import tokenreduce as tr
from tokenreduce.training.learned import train_reducer


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 64, 64, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return TensorDataset(x, y)


def _frozen_vit():
    model = make_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    return model, before


@pytest.mark.parametrize(
    "method,params",
    [("ltmp", {"target": 0.5}), ("dynamicvit", {}), ("tps", {"variant": "dtps"}), ("cropr", {"p": 4})],
)
def test_training_updates_only_the_reducer_and_writes_a_loadable_checkpoint(tmp_path, method, params):
    model, before = _frozen_vit()
    reference = tr.apply(make_vit(), method, **params)._tr_ctx.reducer.module  # same seed: the initial values
    initial = {k: v.clone() for k, v in reference.state_dict().items()}
    lr = 0.05 if method == "ltmp" else 3e-3
    out = train_reducer(model, method, _data(), out_dir=str(tmp_path), batch_size=16, epochs=2, lr=lr,
                        progress=False, checkpoint_every=2, **params)
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)  # backbone frozen
    trained = {k: v.clone() for k, v in model._tr_ctx.reducer.module.state_dict().items()}
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)  # the reducer did learn
    fresh = make_vit()
    tr.apply(fresh, method, checkpoint=out["checkpoint"])
    loaded = fresh._tr_ctx.reducer.module.state_dict()
    assert all(torch.equal(loaded[k], trained[k]) for k in trained)
    assert out["result"].step == 8
    assert '"event": "end"' in (tmp_path / "metrics.jsonl").read_text()


def test_ltmp_training_moves_the_gmacs_ratio_toward_its_target(tmp_path):
    model, _ = _frozen_vit()
    out = tr.train(model, "ltmp", _data(), out_dir=str(tmp_path), batch_size=16, epochs=2, lr=0.05,
                   progress=False, target=0.5, checkpoint_every=100, log_every=1)
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s["event"] == "step"]
    ratios, losses = [s["gmacs_ratio"] for s in steps], [s["loss"] for s in steps]
    assert len(ratios) == 8 and out["result"].last_metrics["gmacs_ratio"] == ratios[-1]
    assert ratios[0] > 0.9 and ratios[-1] < 0.9  # the paper's initial thresholds barely reduce
    assert abs(ratios[-1] - 0.5) < abs(ratios[0] - 0.5)
    assert losses[-1] < losses[0]  # CE + λ·(ratio − target)² goes down


def test_resume_gives_the_same_parameters_as_an_uninterrupted_run(tmp_path):
    data = _data()
    kw = dict(batch_size=16, epochs=2, lr=3e-3, progress=False, p=4)
    full, _ = _frozen_vit()
    train_reducer(full, "cropr", data, out_dir=str(tmp_path / "full"), **kw)
    part, _ = _frozen_vit()
    train_reducer(part, "cropr", data, out_dir=str(tmp_path / "part"), max_steps=3, checkpoint_every=3, **kw)
    resumed, _ = _frozen_vit()
    train_reducer(resumed, "cropr", data, out_dir=str(tmp_path / "part"), resume=True, **kw)
    a = full._tr_ctx.reducer.module.state_dict()
    b = resumed._tr_ctx.reducer.module.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert not torch.equal(a["0.query"], part._tr_ctx.reducer.module.state_dict()["0.query"])


def test_methods_without_parameters_refuse_training(tmp_path):
    with pytest.raises(ValueError, match="nothing to train"):
        train_reducer(make_vit(), "tome", _data(), out_dir=str(tmp_path), progress=False)


@pytest.mark.parametrize("method", ["cropr", "ltmp"])
def test_two_process_gloo_training_keeps_reducers_identical(tmp_path, method):
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("ddp_reducer_script.py")
    port = "29541" if method == "cropr" else "29542"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(script.parent)}
    proc = subprocess.run([*cmd, str(script), str(tmp_path), method], capture_output=True, text=True, env=env,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0["steps"] == r1["steps"] == 4  # 64 samples / (2 ranks × 8)
    initial = tr.apply(make_vit(), method, **({"p": 4} if method == "cropr" else {}))._tr_ctx.reducer.module
    changed = False
    for name, value in r0["state"].items():
        assert torch.equal(value, r1["state"][name]), name
        changed |= not torch.equal(value, initial.state_dict()[name])
    assert changed
    assert (tmp_path / "reducer.safetensors").exists()


@pytest.mark.parametrize("amp", [False, True])
def test_precision_is_applied_and_recorded(tmp_path, amp):
    from tokenreduce.checkpoint import read_reducer

    model = make_vit()
    dtypes = []
    model.head.register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype))
    out = train_reducer(model, "cropr", _data(32), out_dir=str(tmp_path), batch_size=16, epochs=1, p=2,
                        progress=False, amp=amp)
    assert dtypes and set(dtypes) == {torch.bfloat16 if amp else torch.float32}  # autocast really on (or off)
    precision = "bf16 autocast (fp32 weights)" if amp else "fp32"
    meta, _ = read_reducer(out["checkpoint"])
    assert meta["extra"]["precision"] == precision
    assert all(p.dtype == torch.float32 for p in model._tr_ctx.reducer.module.parameters())
    start = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert start["config"]["amp"] is amp and start["config"]["extra"]["precision"] == precision
