"""Issue #18: dtype/device of learned reducers, empty layers, empty batches, deep images, ImageFolder counts,
interrupted / resumed / cut-short training."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_vit
from PIL import Image
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import TensorDataset

import tokenreduce as tr
from tokenreduce.checkpoint import read_reducer
from tokenreduce.cli import main
from tokenreduce.images import load_image
from tokenreduce.methods import get_method
from tokenreduce.training import CheckpointError, ClassificationTask, TrainConfig, load_checkpoint, train
from tokenreduce.training.engine import TrainingInterrupted
from tokenreduce.training.learned import train_reducer

LEARNED = [m for m in tr.methods() if get_method(m).learned]
FITS = {"cropr": {"p": 4}}  # cropr's default p=8 prunes more than make_vit's 64 patches over its blocks


def applied(model, method, **params):
    """``method`` on ``model`` with parameters that fit ``make_vit`` (learned ones freshly initialised)."""
    return tr.apply(model, method, untrained=get_method(method).learned, **{**FITS.get(method, {}), **params})


# -- 1. a learned reducer follows the model's dtype and device ------------------------------------------------


@pytest.mark.parametrize("method", LEARNED)
@pytest.mark.parametrize("when", ["before", "after"])
def test_learned_parameters_follow_the_model_dtype(method, when):
    model = make_vit(depth=4)
    keys, n_params = list(model.state_dict()), len(list(model.parameters()))
    if when == "before":
        model.to(torch.bfloat16)
    applied(model, method, **({"layers": (1, 2)} if "layers" in _fields(method) else {}))
    if when == "after":
        model.to(torch.bfloat16)
    module = tr.reducer(model).module
    assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    x = torch.randn(2, 3, 64, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        assert model(x).dtype == torch.bfloat16
        model.float()  # back, and .half() too: every conversion routes through nn.Module._apply
        assert {p.dtype for p in module.parameters()} == {torch.float32}
        assert model(x.float()).dtype == torch.float32
        model.half()
        assert {p.dtype for p in module.parameters()} == {torch.float16}
        model.to(memory_format=torch.channels_last)  # 4-D tensors only; must not fail on the reducer
    # the reducer's parameters are not the model's: state_dict and parameters() stay stock
    assert list(model.state_dict()) == keys and len(list(model.parameters())) == n_params
    # and remove gives back the stock forward, bit for bit (of a stock model converted the same way)
    model.to(torch.bfloat16)
    tr.remove(model)
    stock = make_vit(depth=4).to(torch.bfloat16).float().half().to(memory_format=torch.channels_last)
    stock.to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(model(x), stock(x))


def test_learned_parameters_follow_the_model_device():
    """``.cuda()`` / ``.to(device)`` go through the same ``_apply``; the meta device shows it without a GPU."""
    model = applied(make_vit(depth=4), "dynamicvit", layers=(1, 2))
    model.to("meta")
    assert {p.device.type for p in tr.reducer(model).module.parameters()} == {"meta"}
    assert all(p.device.type == "meta" for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_learned_parameters_follow_cuda():
    model = applied(make_vit(depth=4), "dtps", layers=(1, 2)).cuda().half()
    assert {(p.device.type, p.dtype) for p in tr.reducer(model).module.parameters()} == {("cuda", torch.float16)}
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64, device="cuda", dtype=torch.float16)).isfinite().all()


def test_apply_puts_a_checkpoint_on_the_model_dtype(tmp_path):
    model = applied(make_vit(depth=4), "dynamicvit", layers=(1, 2))
    from tokenreduce.checkpoint import save_reducer

    save_reducer(tr.reducer(model), tmp_path / "r.safetensors")
    half = tr.apply(make_vit(depth=4).half(), "dynamicvit", checkpoint=tmp_path / "r.safetensors")
    assert {p.dtype for p in tr.reducer(half).module.parameters()} == {torch.float16}


# -- 2. layers=() is refused ------------------------------------------------------------------------------------


def _fields(method: str) -> set[str]:
    cls, _ = get_method(method).resolve({})
    return {f.name for f in dataclasses.fields(cls.Params)}


LAYERED = [m for m in tr.methods() if "layers" in _fields(m)]


def test_every_layered_method_is_checked():
    assert {"bat", "dtps", "dynamicvit", "evit", "ppt", "random", "tps"} <= set(LAYERED)


@pytest.mark.parametrize("method", LAYERED)
@pytest.mark.parametrize("layers,match", [((), "empty layers would reduce nothing"), ([], "empty layers"),
                                          (3, "sequence of 0-based block indices"),
                                          ((1.5,), "sequence of 0-based block indices")])
def test_empty_or_malformed_layers_are_refused(method, layers, match):
    with pytest.raises(ValueError, match=match):
        applied(make_vit(depth=4), method, layers=layers)


# -- 3. an empty batch gives the stock model's empty output -----------------------------------------------------


@pytest.mark.parametrize("method", tr.methods())
@pytest.mark.parametrize("config", [{}, {"class_token": False, "global_pool": "avg", "reg_tokens": 2}])
def test_empty_batch_has_the_stock_output(method, config):
    stock = make_vit(depth=4, **config)
    model = make_vit(depth=4, **config)
    params = {"layers": (1, 2)} if "layers" in _fields(method) else {}
    applied(model, method, trace_source=True, **params)
    empty = torch.randn(0, 3, 64, 64)
    for training in (False, True):
        stock.train(training)
        model.train(training)
        assert model(empty).shape == stock(empty).shape == (0, 10)
        assert model.forward_features(empty).shape == stock.forward_features(empty).shape
    model.eval()
    with torch.no_grad():
        model(empty)
        assert tr.last_forward(model).batch_size == 0 and tr.stats(model) is not None
        assert model(torch.randn(2, 3, 64, 64)).isfinite().all()  # and the next real batch is reduced as before


# -- 4. 16-bit and other deep images are converted by their range ---------------------------------------------------


@pytest.fixture
def png16(tmp_path) -> tuple[Path, np.ndarray]:
    """A 64×64 16-bit greyscale PNG with values spread over 0..65535 (a horizontal ramp)."""
    values = np.tile(np.linspace(0, 65535, 64), (64, 1)).round().astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode in ("I;16", "I")
    return path, values


def test_16_bit_png_is_scaled_not_clipped(png16):
    path, values = png16
    expected = np.rint(values / 257.0)
    for channels in (1, 3):
        img = np.asarray(load_image(path, channels), dtype=np.float64)
        img = img if channels == 1 else img[..., 0]
        assert np.abs(img - expected).max() <= 1
        assert 120 < img.mean() < 135  # PIL's own convert() gives ~254: near-white


def test_float_and_12_bit_images_use_their_range(tmp_path):
    ramp = np.tile(np.linspace(0, 1, 32, dtype=np.float32), (32, 1))
    Image.fromarray(ramp, mode="F").save(tmp_path / "f.tiff")
    Image.fromarray((ramp * 4095).round().astype(np.uint16)).save(tmp_path / "b12.png")
    for name in ("f.tiff", "b12.png"):
        img = np.asarray(load_image(tmp_path / name, 1))
        assert img.min() == 0 and img.max() == 255, name


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "I", "F"])
def test_every_mode_reads_as_8_bit(tmp_path, mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    img = rgb.convert("L").convert(mode) if mode in ("I", "F") else rgb.convert(mode)
    path = tmp_path / f"img.{'png' if mode in ('1', 'L', 'LA', 'P', 'RGB', 'RGBA') else 'tiff'}"
    img.save(path)
    assert load_image(path, 1).mode == "L" and load_image(path, 3).mode == "RGB"


def test_unconvertible_mode_and_channel_count_are_refused(tmp_path):
    Image.new("LAB", (8, 8)).save(tmp_path / "lab.tiff")
    with pytest.raises(ValueError, match="cannot convert a 'LAB' image to 'L'"):
        load_image(tmp_path / "lab.tiff", 1)
    with pytest.raises(ValueError, match="not 4 channels"):
        load_image(tmp_path / "lab.tiff", 4)


def test_visualize_command_reads_a_16_bit_png_by_its_range(png16, tmp_path, monkeypatch):
    import tokenreduce.viz
    from tokenreduce.models.reference import preprocess

    path, values = png16
    seen, real = {}, tokenreduce.viz.visualize

    def capture(model, x, *args, **kwargs):
        seen["x"] = x
        return real(model, x, *args, **kwargs)

    monkeypatch.setattr(tokenreduce.viz, "visualize", capture)
    assert main(["visualize", str(path), "--method", "tome", "--out", str(tmp_path / "t.png")]) == 0
    eight = Image.fromarray(np.rint(values / 257.0).astype(np.uint8)).resize((28, 28))
    expected = preprocess(torch.from_numpy(np.asarray(eight).copy()).unsqueeze(0))
    torch.testing.assert_close(seen["x"], expected, atol=0.05, rtol=0)
    white = preprocess(torch.full((1, 28, 28), 255, dtype=torch.uint8))
    assert (seen["x"] - white).abs().mean() > 0.5  # not near-white


# -- 5. ImageFolder counts add up ---------------------------------------------------------------------------------


def test_imagefolder_summary_counts_scored_and_skipped(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for c in range(10):  # the reference model's 10 classes, one image each, plus one unreadable file
        (tmp_path / "data" / str(c)).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(tmp_path / "data" / str(c) / "a.png")
    (tmp_path / "data" / "0" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "eval.json"
    args = ["evaluate", "--data-dir", str(tmp_path / "data"), "--method", "tome", "--repeats", "1", "--no-progress",
            "--json", str(out)]
    assert main(args) == 0
    assert "10 images scored, 1 unreadable skipped" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["samples"] == 10 and len(result["skipped_images"]) == 1
    assert all(row["samples"] == 10 for row in result["rows"])


# -- 6. interrupted, resumed and cut-short training ---------------------------------------------------------------


def tiny_model():
    return make_vit(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=4).train()


def toy_data(n: int = 64) -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, 16, 16, generator=gen), torch.arange(n) % 4)


def engine_config(out, **kw) -> TrainConfig:
    base = dict(out_dir=str(out), epochs=2, batch_size=8, lr=3e-3, warmup_steps=2, checkpoint_every=5,
                log_every=1, progress=False)
    return TrainConfig(**{**base, **kw})


class SignalAt(ClassificationTask):
    """Sends this process ``signum`` during the loss of step ``at`` (1-based)."""

    def __init__(self, at: int, signum: int) -> None:
        super().__init__()
        self.at, self.signum, self.calls = at, signum, 0

    def loss(self, model, batch):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), self.signum)
        return super().loss(model, batch)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_checkpoints_the_step_and_resume_is_exact(tmp_path, signum):
    data = toy_data()
    full = tiny_model()
    train(full, ClassificationTask(), data, engine_config(tmp_path / "full"))
    before = signal.getsignal(signum)
    with pytest.raises(TrainingInterrupted) as stop:
        train(tiny_model(), SignalAt(3, signum), data, engine_config(tmp_path / "cut"))
    assert signal.getsignal(signum) is before  # the handlers are restored
    assert (stop.value.signum, stop.value.step, stop.value.total_steps) == (signum, 3, 16)
    assert isinstance(stop.value, KeyboardInterrupt)
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["step"] == 3  # off the checkpoint grid (5)
    log = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert log[-1] == {"event": "interrupted", "step": 3, "signal": signal.Signals(signum).name}
    resumed = tiny_model()
    result = train(resumed, ClassificationTask(), data, engine_config(tmp_path / "cut", resume=True))
    assert result.step == 16 and result.complete
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_a_signal_at_the_last_step_ends_the_run_normally(tmp_path):
    result = train(tiny_model(), SignalAt(8, signal.SIGTERM), toy_data(), engine_config(tmp_path, epochs=1))
    assert result.step == result.total_steps == 8 and result.complete


def fashion_like(n: int = 4000) -> TensorDataset:
    """Fashion-MNIST-shaped samples for the reference model: uint8 28×28 images, 10 classes."""
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g), torch.arange(n) % 10)


DRIVER = """
import sys, torch
import tokenreduce.cli.commands as commands
from tokenreduce.cli import main
from tokenreduce.models.reference import preprocess
from test_robustness import fashion_like
torch.set_num_threads(1)
data = fashion_like()  # 1000 steps of 4: far more than the test waits for
commands.training_data = lambda *a: (data, preprocess)
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def fashion_data(monkeypatch):
    """``tokenreduce train`` on :func:`fashion_like` data instead of the Fashion-MNIST files."""
    import tokenreduce.cli.commands as commands
    from tokenreduce.models.reference import preprocess

    data = fashion_like()
    monkeypatch.setattr(commands, "training_data", lambda *a: (data, preprocess))


def test_ctrl_c_during_tokenreduce_train_checkpoints_and_resumes(tmp_path, fashion_data, capsys):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    run = tmp_path / "run"
    args = ["train", "--method", "cropr", "--param", "p=4", "--out", str(run), "-b", "4", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.Popen([sys.executable, str(driver), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    log = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (log.is_file() and '"event": "step"' in log.read_text()):  # the first logged step (10)
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "timeout"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "--resume" in err and f"--out {run}" in err
    step = load_checkpoint(run / "checkpoint.pt")["step"]
    assert 10 <= step < 1000
    assert json.loads(log.read_text().splitlines()[-1]) == {"event": "interrupted", "step": step, "signal": "SIGINT"}
    assert not (run / "reducer.safetensors").exists()  # only a finished (or --max-steps) run writes it

    # the same command plus --resume continues from that step (here for two more steps, in this process)
    assert main([*args, "--resume", "--max-steps", str(step + 2)]) == 0
    assert json.loads(log.read_text().splitlines()[-1])["step"] == step + 2
    resumes = [json.loads(line) for line in log.read_text().splitlines() if '"event": "resume"' in line]
    assert resumes == [{"event": "resume", "step": step}]
    assert load_checkpoint(run / "checkpoint.pt")["step"] == step + 2
    assert "INCOMPLETE" in capsys.readouterr().out


def test_resume_without_a_checkpoint_is_refused(tmp_path, fashion_data, capsys):
    with pytest.raises(CheckpointError, match="no checkpoint to resume in"):
        train(tiny_model(), ClassificationTask(), toy_data(), engine_config(tmp_path / "run", resume=True))
    assert not (tmp_path / "run").exists()  # nothing written: no second run appended to a log
    (tmp_path / "killed").mkdir()  # a run killed before its first checkpoint: a log, no checkpoint
    (tmp_path / "killed" / "metrics.jsonl").write_text('{"event": "start"}\n')
    with pytest.raises(CheckpointError, match="no checkpoint to resume"):
        train(tiny_model(), ClassificationTask(), toy_data(), engine_config(tmp_path / "killed", resume=True))
    assert (tmp_path / "killed" / "metrics.jsonl").read_text() == '{"event": "start"}\n'
    run = ["train", "--method", "cropr", "--param", "p=4", "--out", str(tmp_path / "none"), "--resume",
           "--no-progress"]
    assert main(run) == 2
    assert "no checkpoint to resume in" in capsys.readouterr().err


def test_orphaned_temporaries_are_removed_on_the_next_start(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    orphans = [run / ".checkpoint.pt.k3j_x9a1.tmp", run / ".reducer.safetensors.abc12345.tmp",
               run / ".model.safetensors.q1w2e3r4.tmp"]
    others = [run / ".notes.txt.tmp", run / "checkpoint.pt.tmp", run / "keep.tmp"]
    for path in orphans + others:
        path.write_bytes(b"half-written")
    train_reducer(make_vit(), "cropr", TensorDataset(torch.randn(16, 3, 64, 64), torch.arange(16) % 10),
                  out_dir=str(run), batch_size=8, max_steps=1, progress=False, p=4)
    assert not any(p.exists() for p in orphans)
    assert all(p.exists() for p in others)  # only the temporaries of the run's own files are touched


def test_max_steps_marks_the_reducer_incomplete(tmp_path):
    data = TensorDataset(torch.randn(32, 3, 64, 64), torch.arange(32) % 10)
    kw = dict(batch_size=8, progress=False, p=4)
    cut = train_reducer(make_vit(), "cropr", data, out_dir=str(tmp_path / "cut"), max_steps=2, **kw)
    assert cut["complete"] is False and not cut["result"].complete
    extra = read_reducer(cut["checkpoint"])[0]["extra"]
    assert (extra["complete"], extra["steps"], extra["total_steps"]) == (False, 2, 4)
    done = train_reducer(make_vit(), "cropr", data, out_dir=str(tmp_path / "cut"), resume=True, **kw)
    assert done["complete"] is True
    extra = read_reducer(done["checkpoint"])[0]["extra"]
    assert (extra["complete"], extra["steps"], extra["total_steps"]) == (True, 4, 4)


# -- 7. what the property test (test_fuzz_api.py) found -------------------------------------------------------


@pytest.mark.parametrize("method", ["tps", "evit", "bat", "random"])
def test_a_tiny_keep_rate_keeps_one_patch_token(method):
    """``ceil(ρ·M)`` is at least 1 for any ρ > 0; rounding used to make ρ = 1e-9 keep none (tps crashed)."""
    model = applied(make_vit(depth=4, class_token=False, global_pool="avg"), method, keep_rate=1e-9, layers=(1,))
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).isfinite().all()
    if method in ("tps", "random"):  # prefix-free model: the one kept patch token (evit adds its fused one)
        assert tr.last_forward(model).block_tokens[1][1] == 1


def test_dtps_squeezes_nothing_when_a_stage_keeps_every_token():
    """4 patches at keep rate 0.34: stage 2 keeps as many as are left, so nothing is squeezed (an empty
    scatter, which used to fail to reshape)."""
    model = VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=3, num_heads=2, reg_tokens=1,
                              num_classes=5).eval()
    tr.apply(model, "dtps", untrained=True, layers=(0, 1), keep_rate=0.34)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).isfinite().all()


def test_ltmp_training_form_traces_sources_as_inference_does():
    """trace_source=True in train mode: LTMP's training form dropped the sources (the token map crashed)."""
    x = torch.randn(2, 3, 64, 64)
    model = tr.apply(make_vit(depth=4), "ltmp", untrained=True, trace_source=True, merge_threshold=0.5)
    with torch.no_grad():
        model(x)
        inference = tr.last_forward(model)
        model.train()(x)
        training = tr.last_forward(model)
    assert (torch.as_tensor(inference.block_tokens[-1][1]) < 65).all()  # tokens merged
    covered = inference.source.sum(1) if inference.mask is None else (inference.source * inference.mask).sum(1)
    assert torch.equal((training.source * training.mask).sum(1), covered)  # every patch held by the same count
    assert len(training.stages) == len(inference.stages) == 4


def test_resuming_another_methods_run_is_a_clean_error(tmp_path, fashion_data, capsys):
    common = ["train", "--out", str(tmp_path / "run"), "-b", "4", "--no-progress"]
    assert main([*common, "--method", "cropr", "--param", "p=4", "--max-steps", "1"]) == 0
    capsys.readouterr()
    for other in (["--method", "dynamicvit"], ["--method", "cropr", "--param", "p=3"]):
        assert main([*common, *other, "--max-steps", "2", "--resume"]) == 2
        err = capsys.readouterr().err
        assert "is from another run: " in err and "Traceback" not in err
        assert ("method: 'cropr' there, 'dynamicvit' here" if "dynamicvit" in other else "params:") in err
