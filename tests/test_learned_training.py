"""Training learned reducers through the engine: GMACs move, resume is exact, checkpoints load."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import free_port, make_vit
from torch.utils.data import TensorDataset

import tokenreduce as tr
from tokenreduce.checkpoint import read_reducer
from tokenreduce.training.learned import task_for, token_distillation, train_reducer


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
    [("ltmp", {"target": 0.5}), ("dynamicvit", {}), ("dtps", {}), ("cropr", {"p": 4})],
)
def test_training_updates_only_the_reducer_and_writes_a_loadable_checkpoint(tmp_path, method, params):
    model, before = _frozen_vit()
    # same seed: the initial values
    reference = tr.reducer(tr.apply(make_vit(), method, untrained=True, **params)).module
    initial = {k: v.clone() for k, v in reference.state_dict().items()}
    lr = 0.05 if method == "ltmp" else 3e-3
    out = train_reducer(model, method, _data(), out_dir=str(tmp_path), batch_size=16, epochs=2, lr=lr,
                        progress=False, checkpoint_every=2, **params)
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)  # backbone frozen
    trained = {k: v.clone() for k, v in tr.reducer(model).module.state_dict().items()}
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)  # the reducer did learn
    fresh = make_vit()
    tr.apply(fresh, method, checkpoint=out["checkpoint"])
    loaded = tr.reducer(fresh).module.state_dict()
    assert all(torch.equal(loaded[k], trained[k]) for k in trained)
    assert out["result"].step == 8
    assert '"event": "end"' in (tmp_path / "metrics.jsonl").read_text()


def test_ltmp_training_moves_the_gmacs_ratio_toward_its_target(tmp_path):
    model, _ = _frozen_vit()
    # θ_merge only learns from tokens that merge (official rule); this random-weight model's keys never reach
    # the paper's initial 0.9 similarity (a pretrained model's do), so start where some tokens merge
    out = tr.train(model, "ltmp", _data(), out_dir=str(tmp_path), batch_size=16, epochs=2, lr=0.05,
                   progress=False, target=0.5, merge_threshold=0.75, checkpoint_every=100, log_every=1)
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s["event"] == "step"]
    ratios, losses = [s["gmacs_ratio"] for s in steps], [s["loss"] for s in steps]
    assert len(ratios) == 8 and out["result"].last_metrics["gmacs_ratio"] == ratios[-1]
    assert ratios[0] > 0.9 and ratios[-1] < 0.9  # barely reduces at first
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
    a = tr.reducer(full).module.state_dict()
    b = tr.reducer(resumed).module.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert not torch.equal(a["0.query"], tr.reducer(part).module.state_dict()["0.query"])


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
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(script.parent)}
    proc = subprocess.run([*cmd, str(script), str(tmp_path), method], capture_output=True, text=True, env=env,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0["steps"] == r1["steps"] == 4  # 64 samples / (2 ranks × 8)
    initial = tr.reducer(tr.apply(make_vit(), method, untrained=True, **({"p": 4} if method == "cropr" else {}))).module
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
    assert all(p.dtype == torch.float32 for p in tr.reducer(model).module.parameters())
    start = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert start["config"]["amp"] is amp and start["config"]["extra"]["precision"] == precision


def test_token_distillation_by_hand():
    student = torch.tensor([[[1.0, 0.0], [5.0, 5.0], [0.0, 2.0]]], requires_grad=True)
    teacher = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]]])
    mask = torch.tensor([[[1.0], [0.0], [1.0]]], requires_grad=True)
    # MSE over the two live tokens and both channels: (1 + 0 + 1 + 1) / 4
    assert token_distillation(student, teacher, mask, "mse").item() == pytest.approx(0.75)
    # KL per live token of the channel softmaxes, averaged over the live tokens, as TPS's loss
    # computes it (F.kl_div with batchmean over the selected rows).
    rows = mask[0, :, 0].detach() > 0.5
    expected = F.kl_div(F.log_softmax(student[0, rows], -1), F.log_softmax(teacher[0, rows], -1),
                        reduction="batchmean", log_target=True)
    kl = token_distillation(student, teacher, mask, "kl")
    torch.testing.assert_close(kl, expected)
    kl.backward()
    assert mask.grad is None  # the mask only selects: no gradient into the predictors through it
    assert float(student.grad[0, 1].abs().sum()) == 0.0  # nor into a removed token
    assert token_distillation(student, teacher, torch.zeros(1, 3, 1), "mse").item() == 0.0
    with pytest.raises(ValueError, match="mse"):
        token_distillation(student, teacher, mask, "l1")


def test_teacher_is_unreduced_deterministic_and_fixed():
    model = make_vit(drop_path_rate=0.5)
    tr.apply(model, "dynamicvit", untrained=True)
    model.train()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), tr.unreduced(model):
        model.eval()
        reference = model(images)
        model.train()
    task = task_for(tr.reducer(model))
    first = task.teacher_outputs(model, images)[1]
    torch.testing.assert_close(first, reference)  # eval mode: no drop-path, no reduction
    torch.testing.assert_close(task.teacher_outputs(model, images)[1], reference)
    assert all(m.training for m in model.modules())  # the student's modes are restored
    # Fine-tuning: a frozen copy taken before training, so the teacher does not follow the student.
    tuned = task_for(tr.reducer(model), finetune=True)
    tuned.prepare(model)
    with torch.no_grad():
        model.head.weight.add_(1.0)
    torch.testing.assert_close(tuned.teacher_outputs(model, images)[1], reference)
    assert type(task_for(tr.reducer(tr.apply(make_vit(), "tps", untrained=True, variant="dtps")))).token_loss == "kl"


def test_distill_weight_zero_skips_the_teacher(tmp_path):
    model = tr.apply(make_vit().train(), "tps", untrained=True, variant="dtps")
    task = task_for(tr.reducer(model), distill_weight=0.0)

    def no_teacher(*args):
        raise AssertionError("the teacher ran")

    task.teacher_outputs = no_teacher
    loss, metrics = task.loss(model, (torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))))
    assert torch.isfinite(loss) and "logit_kl" not in metrics
    with pytest.raises(ValueError, match="distill_weight"):
        task_for(tr.reducer(model), distill_weight=-1.0)
    with pytest.raises(ValueError, match="distill_weight applies to dtps, dynamicvit only"):
        train_reducer(make_vit(), "ltmp", _data(), out_dir=str(tmp_path), distill_weight=0.0, progress=False)
    with pytest.raises(ValueError, match="label_smoothing applies to ltmp only"):
        train_reducer(make_vit(), "cropr", _data(), out_dir=str(tmp_path), label_smoothing=0.1, progress=False)
    out = train_reducer(make_vit(), "ltmp", _data(16), out_dir=str(tmp_path / "ls"), batch_size=8, max_steps=1,
                        label_smoothing=0.0, progress=False)
    assert read_reducer(out["checkpoint"])[0]["extra"]["label_smoothing"] == 0.0


def test_finetuning_writes_the_backbone_it_trained(tmp_path):
    from safetensors.torch import load_file

    model = make_vit()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    out = train_reducer(model, "dynamicvit", _data(16), out_dir=str(tmp_path), batch_size=8, epochs=1, lr=1e-2,
                        finetune=True, progress=False)
    saved = load_file(out["model"])
    assert saved.keys() == initial.keys()
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    assert any(not torch.equal(saved[k], initial[k]) for k in initial)  # the backbone did train
    assert "model" not in train_reducer(make_vit(), "dynamicvit", _data(8), out_dir=str(tmp_path / "frozen"),
                                        batch_size=8, progress=False)


def test_ltmp_learning_rate_is_constant(tmp_path):
    # the official run is one epoch of timm's per-epoch cosine: the rate never moves within it
    model = make_vit(depth=2)
    train_reducer(model, "ltmp", _data(48), out_dir=str(tmp_path), batch_size=8, epochs=1, progress=False,
                  log_every=1, checkpoint_every=100)
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = [s["lr"] for s in steps if s["event"] == "step"]
    assert lrs == [5e-3] * 6


def test_ltmp_task_uses_label_smoothing():
    from tokenreduce.methods.ltmp import flops_ratio
    from tokenreduce.training.learned import LTMPTask

    model = tr.apply(make_vit(depth=2).train(), "ltmp", untrained=True, target=0.5)
    reducer = tr.reducer(model)
    task = LTMPTask(reducer)
    assert task.label_smoothing == 0.1
    images, labels = _data(4)[:]
    loss, _ = task.loss(model, (images, labels))
    with torch.no_grad():
        logits = model(images)  # deterministic: no dropout in this model
        ratio = flops_ratio(tr.last_forward(model).block_tokens, reducer.info, tr.last_forward(model).num_tokens_in)
    expected = F.cross_entropy(logits, labels, label_smoothing=0.1) + 10.0 * (ratio - 0.5) ** 2
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    plain, _ = LTMPTask(reducer, label_smoothing=0.0).loss(model, (images, labels))
    assert float(plain.detach()) == pytest.approx(float(expected - F.cross_entropy(logits, labels, label_smoothing=0.1)
                                               + F.cross_entropy(logits, labels)), rel=1e-5)


def test_ltmp_finetune_freezes_the_norms(tmp_path):
    from tokenreduce.training.learned import LTMPTask

    model = make_vit(depth=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_reducer(model, "ltmp", _data(16), out_dir=str(tmp_path), batch_size=8, epochs=1, lr=0.05, finetune=True,
                  progress=False, checkpoint_every=100)
    after = model.state_dict()
    names = [name for name, _ in model.named_parameters()]
    norms = [name for name in names if "norm" in name]
    assert norms and all(torch.equal(after[n], before[n]) for n in norms)  # official: "norm" params frozen
    assert all(not torch.equal(after[n], before[n]) for n in ("blocks.0.attn.qkv.weight", "head.weight"))
    task = LTMPTask(tr.reducer(model), finetune=True)
    trainable = {id(p) for p in task.trainable_parameters(model)}
    grouped = {id(p) for g in task.param_groups(model) for p in g["params"]}
    named = dict(model.named_parameters())
    assert trainable == grouped
    assert {n for n in names if id(named[n]) in trainable} == set(names) - set(norms)
