"""Do the saved GMACs turn into time in ONNX Runtime?  Reduced vs unreduced exported models.

DeiT-S (timm ``deit_small_patch16_224``, random weights, 224², fp32) is exported unreduced and with every
fixed-schedule method at its defaults (:func:`tokenreduce.export_onnx`, each file verified against PyTorch).
The two sessions are timed alternately in one process (medians of repeats, after a warm-up) at
``--batch-size`` (throughput) and at batch 1 (latency); printed per method: the GMACs ratio, the
speed-up and the efficiency = speed-up ÷ (unreduced GMACs / reduced GMACs), 1.0 meaning that the time
saved equals the GMACs saved.

    python benchmarks/onnx_speed.py                                   # every fixed-schedule method
    python benchmarks/onnx_speed.py --methods tome evit --repeats 5 --json onnx_speed.json
    python benchmarks/onnx_speed.py --methods bat --profile            # + ONNX Runtime's time per op type
    python benchmarks/onnx_speed.py --provider CUDAExecutionProvider   # needs onnxruntime-gpu

The learned methods (dTPS, DynamicViT, Cropr) run with untrained parameters spread out at random (their
freshly initialised predictors score every token almost alike, and a near tie can tip either way at
float32 rounding, which the export's verification rightly refuses); only their timing matters here.
``--profile`` adds, per method, ONNX Runtime's per-op profile of both models at ``--batch-size``: the
time per op type (ms per forward), to show which ops the reduction adds and what they cost.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import timm
import torch

import tokenreduce as tr
from tokenreduce.eval.throughput import interleaved_seconds, wall_clock
from tokenreduce.export import FIXED_SCHEDULE, ort_session, run_onnx

METHOD_PARAMS: dict[str, tuple[str, dict[str, Any]]] = {
    "dtps": ("tps", {"variant": "dtps", "untrained": True}),
    "dynamicvit": ("dynamicvit", {"untrained": True}),
    "cropr": ("cropr", {"untrained": True}),
}
"""Method name → ``tr.apply`` method and arguments (the learned ones untrained); others: the name, defaults."""


def make_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).eval()


def spread_learned(model: torch.nn.Module) -> None:
    """Move an untrained reducer's parameters apart so that its token scores do not nearly tie."""
    module = tr.reducer(model).module
    if module is None:
        return
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.5)


def time_sessions(sessions: dict[str, Any], x: torch.Tensor, repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per forward of every session, the sessions taking turns."""
    feed = x.numpy()
    runs = {name: wall_clock(lambda s=s: s.run(None, {s.get_inputs()[0].name: feed})) for name, s in sessions.items()}
    seconds = interleaved_seconds(runs, repeats, warmup=warmup, alternate_order=True)
    return {name: statistics.median(values) for name, values in seconds.items()}


def op_profile(path: Path, x: torch.Tensor, provider: str, threads: int | None, runs: int,
               prefix: str) -> dict[str, float]:
    """ONNX Runtime's per-op profile of ``runs`` forwards after an untimed one: ms per forward, by op type."""
    session = ort_session(path, provider, threads=threads, profile=prefix)
    for _ in range(runs + 1):
        run_onnx(session, x)
    events = json.loads(Path(session.end_profiling()).read_text())
    windows = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[1:]
    totals: dict[str, float] = defaultdict(float)
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        if any(start <= event["ts"] <= end for start, end in windows):  # not the warm-up forward
            totals[event["args"]["op_name"]] += event["dur"] / 1e3
    return {op: ms / max(len(windows), 1) for op, ms in totals.items()}


def print_profile(method: str, base: dict[str, float], reduced: dict[str, float], top: int = 14) -> None:
    ops = sorted(set(base) | set(reduced), key=lambda op: -max(base.get(op, 0.0), reduced.get(op, 0.0)))
    print(f"  per-op profile, {method} (ms per forward; unreduced | reduced):")
    for op in ops[:top]:
        print(f"    {op:<22} {base.get(op, 0.0):>9.2f} | {reduced.get(op, 0.0):>9.2f}")
    print(f"    {'total':<22} {sum(base.values()):>9.2f} | {sum(reduced.values()):>9.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--methods", nargs="+", default=list(FIXED_SCHEDULE), help="default: every fixed-schedule "
                        "method (%(default)s)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per model at --batch-size")
    parser.add_argument("--latency-repeats", type=int, default=15, help="timed forwards per model at batch 1")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: its own)")
    parser.add_argument("--provider", default="CPUExecutionProvider",
                        help="ONNX Runtime execution provider (CUDAExecutionProvider where onnxruntime-gpu is "
                        "installed; default: %(default)s)")
    parser.add_argument("--out-dir", help="keep the exported files here (default: a temporary folder)")
    parser.add_argument("--profile", action="store_true", help="print ONNX Runtime's time per op type too")
    parser.add_argument("--profile-runs", type=int, default=2)
    parser.add_argument("--json", help="write all rows here")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.methods) - set(tr.methods()) - {"dtps"})
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}")

    import onnxruntime

    tr.set_cpu_kernels("off")  # the eager reference path; the exported graphs never use the kernel
    folder = Path(args.out_dir) if args.out_dir else Path(tempfile.mkdtemp(prefix="onnx_speed-"))
    folder.mkdir(parents=True, exist_ok=True)
    model = make_model(args.model)
    shape = (2, 3, *model.patch_embed.img_size)
    gmacs_base = tr.gmacs(model)
    cpu = platform.processor() or platform.machine()
    print(f"# {args.model} (random weights), fp32, ONNX Runtime {onnxruntime.__version__} {args.provider}, "
          f"{args.threads or 'default'} threads, {cpu}, torch {torch.__version__}")
    base_path = folder / "unreduced.onnx"
    tr.export_onnx(model, base_path, shape)
    big_label = f"bs{args.batch_size} speed-up"
    print(f"{'method':<10} {'GMACs':>13} {'ratio':>6} {'ideal':>6} {big_label:>14} {'eff.':>5} "
          f"{'bs1 speed-up':>12} {'eff.':>5}  {'ms bs' + str(args.batch_size) + ' (base|red.)':>22}")
    sys.stdout.flush()
    rows = []
    for method in args.methods:
        name, params = METHOD_PARAMS.get(method, (method, {}))
        reduced_model = tr.apply(make_model(args.model), name, **params)
        spread_learned(reduced_model)
        path = folder / f"{method}.onnx"
        export = tr.export_onnx(reduced_model, path, shape)
        resolved = {k: v for k, v in tr.reducer(reduced_model).config().items()}
        gmacs = tr.gmacs(make_model(args.model), name, **{k: v for k, v in params.items() if k != "untrained"})
        ideal = gmacs_base / gmacs
        sessions = {"base": ort_session(base_path, args.provider, threads=args.threads),
                    "reduced": ort_session(path, args.provider, threads=args.threads)}
        result: dict[str, dict[str, float]] = {}
        for bs, repeats in ((args.batch_size, args.repeats), (1, args.latency_repeats)):
            x = torch.randn(bs, *shape[1:], generator=torch.Generator().manual_seed(bs))
            seconds = time_sessions(sessions, x, repeats, args.warmup)
            speedup = seconds["base"] / seconds["reduced"]
            result[bs] = {"ms_unreduced": seconds["base"] * 1e3, "ms_reduced": seconds["reduced"] * 1e3,
                          "speedup": speedup, "efficiency": speedup / ideal}
        big, one = result[args.batch_size], result[1]
        print(f"{method:<10} {gmacs_base:>5.2f}->{gmacs:<6.2f} {gmacs / gmacs_base:>6.3f} {ideal:>5.2f}x "
              f"{big['speedup']:>13.2f}x {big['efficiency']:>5.2f} {one['speedup']:>11.2f}x {one['efficiency']:>5.2f}  "
              f"{big['ms_unreduced']:>10.1f}|{big['ms_reduced']:<10.1f}")
        sys.stdout.flush()
        row = {"method": method, "params": resolved, "gmacs_unreduced": gmacs_base, "gmacs_reduced": gmacs,
               "ideal_speedup": ideal, "batch": big, "batch_1": one, "max_abs_diff": export.max_abs_diff}
        if args.profile:
            x = torch.randn(args.batch_size, *shape[1:], generator=torch.Generator().manual_seed(0))
            prof = {kind: op_profile(p, x, args.provider, args.threads, args.profile_runs,
                                     str(folder / f"profile-{method}-{kind}"))
                    for kind, p in (("unreduced", base_path), ("reduced", path))}
            print_profile(method, prof["unreduced"], prof["reduced"])
            row["profile_ms"] = prof
        rows.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "provider": args.provider,
                                               "batch_size": args.batch_size, "rows": rows}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
