"""Detection end to end: the quickstart detector and SSDlite-MobileNetV3 at 320 px, and JSON.

    python bench/bench_detection.py [--quickstart-run DIR] [--skip-ssdlite] [--skip-metrics] [--only-metrics]
                                    [--only-ssdlite] [--select]
                                    [--out bench/results/detection.json]

Each case is one ``robustprune run`` (a fresh run directory, nothing resumed) whose report.json
gives: MACs and parameters dense and pruned, ONNX Runtime p50 latency at batch 1 of the network,
of the host post-processing (threshold, top-k, NMS) and of both, and on ONNX Runtime FP32 for
dense and pruned: clean mAP / mAP@.5, mPC and rPC over the corruptions, mAP under PGD and
TOG-vanishing (crafted on PyTorch, replayed on the engine) and their vanishing rates, and the
parity of PyTorch and ONNX Runtime on detections (mAP on both). Each case replaces its own key
of the output file, so ``--only-ssdlite`` or ``--only-metrics`` keep the other cases' results.

* ``quickstart``: ``deploy_examples/detection_quickstart.yaml`` as it is (target: under
  10 minutes on 2 CPU cores). ``--quickstart-run DIR`` reads a completed run of that recipe (its
  recipe hash is checked) instead; its wall time is then the sum of its stage times.
* ``ssdlite_320``: the same recipe (the same scenes, training, pruning and fine-tuning) with
  ``torchvision:ssdlite320_mobilenet_v3_large`` from random weights at 320x160, one pruning
  step, and the attacks on 20 images.
* ``holdout_selection`` (``--select``): the quickstart's MACs target and fine-tuning length,
  chosen among :data:`SELECTION_CANDIDATES` on 100 held-out training scenes (never the test
  split): each candidate's pruned clean mAP@.5, mAP and rPC there.
* ``metrics``: our COCO evaluation (``toolchain.tasks.det_metrics``) against pycocotools on the
  same random detections (when pycocotools is installed): the largest difference of mAP,
  mAP@.5 and mAP@.75, and the time each takes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from bench_segmentation import _run  # noqa: E402  (one way to run a recipe for a bench)

QUICKSTART = REPO / "deploy_examples" / "detection_quickstart.yaml"
SSDLITE_OVERRIDES = [
    "name=det_ssdlite_320",
    "model.arch=torchvision:ssdlite320_mobilenet_v3_large",
    "model.width=1.0",
    "data.image_size=320",
    "prune.steps=1",
    "prune.importance_batches=1",
    "prune.finetune_between.epochs=0",
    "export.parity_samples=40",
    "validate.batch_size=10",
    "validate.attacks=[{name: pgd, eps: 2/255, steps: 10, samples: 20},"
    " {name: tog-vanishing, eps: 8/255, steps: 10, samples: 20}]",
    "validate.corruptions={names: [gaussian_noise, motion_blur, fog, low_light], severities: [2, 4]}",
    "bench.iterations=20",
    "gates=[]",
    "allow_unverified=true",  # a benchmark, not a release: no gates
]


def _summary(report: dict[str, Any], wall: float, exit_code: int | None) -> dict[str, Any]:
    """The headline numbers of one detection run's report.json."""
    fp32 = {(r["model"], r["batch"]): r for r in report["latency"] if r["precision"] == "fp32"}
    evs = {(e["model"], e["runtime"]): e for e in report["evaluations"] if e["precision"] == "fp32"}

    def scores(ev: dict[str, Any]) -> dict[str, Any]:
        corruptions = ev["corruptions"]
        return {
            "clean_map": ev["map"],
            "clean_map50": ev["map50"],
            "clean_found": ev["clean_accuracy"],
            "mpc": corruptions.get("mpc"),
            "rpc": corruptions.get("rpc"),
            "per_corruption_map": corruptions.get("per_corruption_map"),
            **{f"{a['name']}_{a['mode']}_map": a["map"] for a in ev["attacks"]},
            **{f"{a['name']}_{a['mode']}_map50": a["map50"] for a in ev["attacks"]},
            **{f"{a['name']}_{a['mode']}_vanishing_rate": a["vanishing_rate"] for a in ev["attacks"]},
            "per_class_ap": ev["per_class_ap"],
            "parity": ev["parity"],
        }

    def latency(model: str) -> dict[str, float]:
        row = fp32[(model, 1)]
        return {
            "network_p50_ms": row["p50_ms"],
            "postprocess_p50_ms": row.get("postprocess_p50_ms"),
            "end_to_end_p50_ms": row.get("end_to_end_p50_ms"),
        }

    ort = {m: scores(evs[(m, "onnxruntime")]) for m in ("dense", "pruned") if (m, "onnxruntime") in evs}
    torch_map = {m: evs[(m, "torch")]["map"] for m in ("dense", "pruned") if (m, "torch") in evs}
    models = report["models"]
    dense_lat, pruned_lat = latency("dense"), latency("pruned")
    return {
        "wall_seconds": round(wall, 1),
        "exit_code": exit_code,
        "stage_seconds": report["stage_seconds"],
        "macs": {"dense": models["dense"]["macs"], "pruned": models["pruned"]["macs"]},
        "params": {"dense": models["dense"]["params"], "pruned": models["pruned"]["params"]},
        "macs_reduction": models["pruned"]["macs_reduction"],
        "params_reduction": models["pruned"]["params_reduction"],
        "onnxruntime_batch_1": {"dense": dense_lat, "pruned": pruned_lat},
        "network_speedup_batch_1": dense_lat["network_p50_ms"] / pruned_lat["network_p50_ms"],
        "onnxruntime_fp32": ort,
        "torch_fp32_map": torch_map,
        "map_difference_torch_vs_onnxruntime": {
            m: abs(torch_map[m] - ort[m]["clean_map"]) for m in torch_map if m in ort
        },
        "pruned_minus_dense": {
            "clean_map50": ort["pruned"]["clean_map50"] - ort["dense"]["clean_map50"],
            "rpc": (ort["pruned"]["rpc"] or 0.0) - (ort["dense"]["rpc"] or 0.0),
        },
        "export_parity": report["parity"],
        "gates_passed": report["passed"],
        "intrinsic_gates": report["intrinsic_gates"],
    }


def _quickstart(reuse: str | None, tmp: Path) -> dict[str, Any]:
    if reuse is None:
        wall, code = _run(QUICKSTART, [], tmp / "quickstart")
        report = json.loads((tmp / "quickstart" / "report.json").read_text())
        return {
            "recipe": str(QUICKSTART.relative_to(REPO)),
            "reused_run": None,
            **_summary(report, wall, code),
        }
    sys.path.insert(0, str(REPO))
    from toolchain.recipe import load_recipe

    report = json.loads((Path(reuse) / "report.json").read_text())
    if report.get("recipe_sha256") != load_recipe(QUICKSTART).sha256() or report.get("status") != "completed":
        raise SystemExit(f"{reuse} is not a completed run of {QUICKSTART.name}; run without --quickstart-run")
    wall = sum(v for v in report["stage_seconds"].values() if v)
    return {"recipe": str(QUICKSTART.relative_to(REPO)), "reused_run": reuse, **_summary(report, wall, None)}


#: Settings tried on held-out scenes before the quickstart's were fixed: (MACs target, fine-tune epochs).
SELECTION_CANDIDATES = ((3.0, 3), (3.0, 8), (2.5, 3), (2.5, 8))
SELECTION_OVERRIDES = [
    "data.holdout=100",  # 100 of the 600 training scenes, never trained on: nothing of the test split
    "validate.runtimes=[torch]",
    "validate.attacks=[]",
    "gates=[]",
    "allow_unverified=true",
]


def _select(tmp: Path) -> dict[str, Any]:
    """Each candidate's pruned model scored on held-out training scenes (one run directory, so the
    dense model is trained once and each candidate re-runs pruning onwards); the best clean
    mAP@.5 wins, the shorter fine-tuning on a tie."""
    run_dir = tmp / "selection"
    rows = []
    for target, epochs in SELECTION_CANDIDATES:
        overrides = [
            *SELECTION_OVERRIDES,
            f"prune.target.macs_reduction={target}",
            f"finetune.epochs={epochs}",
        ]
        wall, _ = _run(QUICKSTART, overrides, run_dir)
        report = json.loads((run_dir / "report.json").read_text())
        evs = {e["model"]: e for e in report["evaluations"] if e["runtime"] == "torch"}
        rows.append(
            {
                "macs_target": target,
                "finetune_epochs": epochs,
                "macs_reduction": report["models"]["pruned"]["macs_reduction"],
                "holdout_map50": {m: evs[m]["map50"] for m in ("dense", "pruned")},
                "holdout_map": {m: evs[m]["map"] for m in ("dense", "pruned")},
                "holdout_rpc": {m: evs[m]["corruptions"].get("rpc") for m in ("dense", "pruned")},
                "wall_seconds": round(wall, 1),
            }
        )
        sys.stderr.write(f"selection: {rows[-1]}\n")
    best = max(rows, key=lambda r: (round(r["holdout_map50"]["pruned"], 3), -r["finetune_epochs"]))
    return {
        "split": "data.holdout=100 (held-out training scenes)",
        "overrides": SELECTION_OVERRIDES,
        "candidates": rows,
        "chosen": {"macs_target": best["macs_target"], "finetune_epochs": best["finetune_epochs"]},
    }


def _metrics(images: int = 500, seed: int = 0) -> dict[str, Any]:
    """Our COCO evaluation against pycocotools on the same random detections."""
    sys.path.insert(0, str(REPO))
    import torch

    from toolchain.tasks.det_metrics import coco_scores

    g = torch.Generator().manual_seed(seed)
    preds, targets = [], []
    for _ in range(images):
        n = int(torch.randint(1, 12, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * 400
        boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 80 + 6], 1)
        labels = torch.randint(0, 5, (n,), generator=g)
        ignore = torch.rand(n, generator=g) < 0.05
        keep = torch.rand(n, generator=g) > 0.2
        extra = torch.rand(20, 2, generator=g) * 400
        pred_boxes = torch.cat(
            [(boxes + torch.randn(n, 4, generator=g) * 4)[keep], torch.cat([extra, extra + 30], 1)]
        )
        pred_labels = torch.cat([labels[keep], torch.randint(0, 5, (20,), generator=g)])
        pred_boxes = torch.cat(
            [pred_boxes[:, :2].minimum(pred_boxes[:, 2:]), pred_boxes[:, :2].maximum(pred_boxes[:, 2:])], 1
        )
        preds.append(
            {"boxes": pred_boxes, "scores": torch.rand(len(pred_boxes), generator=g), "labels": pred_labels}
        )
        targets.append({"boxes": boxes, "labels": labels, "ignore": ignore})
    start = time.perf_counter()
    ours = coco_scores(preds, targets, [str(c) for c in range(5)])
    ours_s = time.perf_counter() - start
    result: dict[str, Any] = {
        "images": images,
        "ours": {"map": ours.map, "map50": ours.map50, "map75": ours.map75, "seconds": ours_s},
    }
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        result["pycocotools"] = None
        return result
    start = time.perf_counter()
    anns, dets = [], []
    for i, (p, t) in enumerate(zip(preds, targets, strict=True)):
        for b, c, ig in zip(t["boxes"].tolist(), t["labels"].tolist(), t["ignore"].tolist(), strict=True):
            w, h = b[2] - b[0], b[3] - b[1]
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": c + 1,
                    "bbox": [b[0], b[1], w, h],
                    "area": w * h,
                    "iscrowd": int(ig),
                }
            )
        for b, c, s in zip(p["boxes"].tolist(), p["labels"].tolist(), p["scores"].tolist(), strict=True):
            dets.append(
                {
                    "image_id": i + 1,
                    "category_id": c + 1,
                    "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                    "score": s,
                }
            )
    gt = COCO()
    gt.dataset = {
        "images": [{"id": i + 1} for i in range(images)],
        "annotations": anns,
        "categories": [{"id": c + 1} for c in range(5)],
    }
    gt.createIndex()
    ev = COCOeval(gt, gt.loadRes(dets), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    ref_s = time.perf_counter() - start
    result["pycocotools"] = {
        "map": float(ev.stats[0]),
        "map50": float(ev.stats[1]),
        "map75": float(ev.stats[2]),
        "seconds": ref_s,
    }
    result["max_abs_difference"] = float(
        max(abs(ours.map - ev.stats[0]), abs(ours.map50 - ev.stats[1]), abs(ours.map75 - ev.stats[2]))
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quickstart-run", help="a completed run directory of the quickstart recipe")
    parser.add_argument("--skip-ssdlite", action="store_true")
    parser.add_argument("--skip-metrics", action="store_true")
    parser.add_argument("--only-metrics", action="store_true", help="only the COCO evaluation comparison")
    parser.add_argument("--only-ssdlite", action="store_true", help="only the SSDlite case")
    parser.add_argument(
        "--select", action="store_true", help="only the held-out selection of the quickstart's settings"
    )
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "detection.json"))
    args = parser.parse_args()
    out = Path(args.out)
    # Each case replaces its own key: a partial run keeps the other cases' committed results.
    result: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    result["benchmark"] = "detection"
    only = {"metrics": args.only_metrics, "ssdlite": args.only_ssdlite, "selection": args.select}
    chosen = {case for case, wanted in only.items() if wanted}
    cases = chosen or {"metrics", "quickstart", "ssdlite"} - {
        case for case, skipped in (("metrics", args.skip_metrics), ("ssdlite", args.skip_ssdlite)) if skipped
    }
    if "metrics" in cases:
        result["metrics"] = _metrics()
    with tempfile.TemporaryDirectory() as tmp:
        if "selection" in cases:
            result["holdout_selection"] = _select(Path(tmp))
        if "quickstart" in cases:
            result["quickstart"] = _quickstart(args.quickstart_run, Path(tmp))
        if "ssdlite" in cases:
            wall, code = _run(QUICKSTART, SSDLITE_OVERRIDES, Path(tmp) / "ssdlite")
            report = json.loads((Path(tmp) / "ssdlite" / "report.json").read_text())
            result["ssdlite_320"] = {"overrides": SSDLITE_OVERRIDES, **_summary(report, wall, code)}
            result["environment"] = report["environment"]
    result["machine"] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
