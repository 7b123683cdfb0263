#!/usr/bin/env python
"""Ship a trained reference segmenter and its Cropr segmentation reducer in the package (a maintainer's tool).

``--segmenter DIR`` takes what ``scripts/train_segmenter.py`` wrote (``segmenter_vit.safetensors`` +
``segmenter_vit.json``); ``--cropr DIR`` what ``scripts/train_segmenter.py --cropr`` wrote
(``segmenter_cropr.safetensors`` + ``cropr_seg.safetensors``).  Tensors are stored in bf16 (the
package stays small) and loaded as fp32.  The segmenter's JSON records the scores of the bf16 weights
on all 3,140 evaluation mosaics (``eval``) and on the first 500 (``eval_subset``, which the test suite
checks), and the fp32 training result's (``eval_fp32_weights``); the Cropr reducer's metadata records the
shipped pair's scores the same way (``--cropr`` reads the segmenter shipped in ``--data``, for the
unreduced baseline it was trained from).

    python scripts/ship_segmenter.py --segmenter runs/segmenter2 --cropr runs/cropr_segmenter2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tokenreduce.dense.mosaic import mosaic_testset
from tokenreduce.dense.segmenter import INFO_FILE, WEIGHTS_FILE, load_reference_segmenter
from tokenreduce.training.segmentation import CROPR_REDUCER, CROPR_WEIGHTS_FILE, evaluate_segmenter

PACKAGE_DATA = Path(__file__).resolve().parents[1] / "src" / "tokenreduce" / "data"
SUBSET = 500
"""Evaluation canvases the test suite scores the shipped segmenter on."""


STORAGE = "tensors stored in bf16 (rounded from the fp32 training result), loaded into fp32"


def to_bf16(source: Path, dest: Path, extra: dict | None = None) -> None:
    """``source`` (safetensors) with every floating tensor in bf16, its metadata kept (a reducer checkpoint's
    ``extra`` says how it is stored, plus ``extra``), written to ``dest``."""
    with safe_open(str(source), framework="pt") as f:
        metadata = f.metadata()
    if metadata and "tokenreduce" in metadata:
        record = json.loads(metadata["tokenreduce"])
        record["extra"] = {**record.get("extra", {}), "storage": STORAGE, **(extra or {})}
        metadata = {**metadata, "tokenreduce": json.dumps(record)}
    tensors = {k: v.bfloat16() if v.is_floating_point() else v for k, v in load_file(str(source)).items()}
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dest), metadata=metadata)


def ship_segmenter(folder: Path, data: Path) -> dict:
    info = json.loads((folder / INFO_FILE).read_text())
    if not info.get("complete") or "eval" not in info:
        raise SystemExit(f"{folder} holds no complete segmenter run (its {INFO_FILE} has no final eval)")
    to_bf16(folder / WEIGHTS_FILE, data / WEIGHTS_FILE)
    (data / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")  # the loader reads the architecture from it
    model = load_reference_segmenter(data / WEIGHTS_FILE)
    canvas, target = mosaic_testset()
    info["eval_fp32_weights"] = info["eval"]
    info["storage"] = "weights stored in bf16 (rounded from the fp32 training result), loaded and run in fp32"
    info["eval"] = {**evaluate_segmenter(model, canvas, target), "canvases": len(canvas)}
    info["eval_subset"] = {**evaluate_segmenter(model, canvas[:SUBSET], target[:SUBSET]), "canvases": SUBSET,
                           "note": f"the first {SUBSET} evaluation canvases (checked by the test suite)"}
    (data / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


def ship_cropr(folder: Path, data: Path) -> dict:
    """The Cropr-fine-tuned segmenter and its reducer in bf16; the reducer records the shipped pair's scores
    (``restore="frozen"``, last-layer fusion) on all evaluation canvases and on the tested subset."""
    import tokenreduce as tr
    from tokenreduce.dense.segmenter import load_segmenter_weights

    reducer_name = f"{CROPR_REDUCER}.safetensors"
    for name in (CROPR_WEIGHTS_FILE, reducer_name):
        if not (folder / name).is_file():
            raise SystemExit(f"{folder} has no {name} (a complete `train_segmenter.py --cropr` run writes it)")
    to_bf16(folder / CROPR_WEIGHTS_FILE, data / "reducers" / CROPR_WEIGHTS_FILE)
    to_bf16(folder / reducer_name, data / "reducers" / reducer_name)
    model = load_reference_segmenter(data / WEIGHTS_FILE)
    load_segmenter_weights(model, data / "reducers" / CROPR_WEIGHTS_FILE)
    tr.apply(model.backbone, "cropr", checkpoint=str(data / "reducers" / reducer_name), restore="frozen")
    canvas, target = mosaic_testset()
    scores = {"eval": {**evaluate_segmenter(model, canvas, target), "canvases": len(canvas)},
              "eval_subset": {**evaluate_segmenter(model, canvas[:SUBSET], target[:SUBSET]), "canvases": SUBSET}}
    to_bf16(folder / reducer_name, data / "reducers" / reducer_name, extra=scores)
    return scores


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ship_segmenter.py", description=__doc__.splitlines()[0])
    p.add_argument("--segmenter", type=Path, help="a train_segmenter.py output folder")
    p.add_argument("--cropr", type=Path, help="a train_segmenter.py --cropr output folder")
    p.add_argument("--data", type=Path, default=PACKAGE_DATA, help="the package's data folder")
    args = p.parse_args(argv)
    if args.segmenter is None and args.cropr is None:
        p.error("nothing to ship: give --segmenter and/or --cropr")
    if args.segmenter is not None:
        info = ship_segmenter(args.segmenter, args.data)
        print(json.dumps({k: info[k] for k in ("eval", "eval_subset", "eval_fp32_weights")}, indent=2))
    if args.cropr is not None:
        scores = ship_cropr(args.cropr, args.data)
        print(f"shipped {CROPR_WEIGHTS_FILE} and {CROPR_REDUCER}.safetensors into {args.data / 'reducers'}")
        print(json.dumps(scores, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
