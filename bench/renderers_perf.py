"""Rendered blocks for corruptions, attacks, latency and INT8 (see ``bench/renderers.py``)."""

from __future__ import annotations

import statistics
from typing import Any

import bench_corruptions
from renderers import load, pct, pts, renderer, source, times

# --- corruptions ------------------------------------------------------------------------------


@renderer("corruptions.speed")
def corruptions_speed() -> str:
    result = load("corruptions.json")
    speed = result["speed_224"]["per_corruption"]
    small = result.get("fidelity_32", {}).get("per_corruption", {})
    rows = [
        "| corruption | ours, ms | reference, ms | speed-up | strength ours / reference at 224 px, "
        "severities 1–5 | same at 32 px |",
        "|---|---:|---:|---:|---|---|",
    ]
    for name, row in speed.items():
        ref = row.get("reference_ms_total")
        ratios = " ".join(f"{v:.2f}" for v in row["ratio"].values()) or "–"
        tiny = " ".join(f"{v:.2f}" for v in small.get(name, {}).get("ratio", {}).values()) or "–"
        rows.append(
            f"| `{name}` | {row['ours_ms_total']:.1f} | {f'{ref:.1f}' if ref else '–'} | "
            f"{times(ref / row['ours_ms_total'], 1) if ref else '–'} | {ratios} | {tiny} |"
        )
    total = result["speed_224"]["summary"]
    rows.append(
        f"| **15 ImageNet-C** | **{total['imagenet_c_ours_ms_per_image']:.1f}** | "
        f"**{total['imagenet_c_reference_ms_per_image']:.1f}** | **{times(total['imagenet_c_speedup'], 1)}** | | |"
    )
    return "\n".join([*rows, "", source("corruptions.json")])


@renderer("corruptions.summary")
def corruptions_summary() -> str:
    total = load("corruptions.json")["speed_224"]["summary"]
    ratio, name = total["slowest_vs_reference"]
    return (
        f"the 15 ImageNet-C corruptions × 5 severities take {total['imagenet_c_ours_ms_per_image']:.1f} ms per "
        f"224-px image against the reference's {total['imagenet_c_reference_ms_per_image']:.1f} ms "
        f"(**{times(total['imagenet_c_speedup'], 1)}**); the closest to the reference at 224 px is "
        f"`{name}` at {times(ratio, 1)}"
    )


@renderer("corruptions.throughput")
def corruptions_throughput() -> str:
    result = load("corruptions.json")
    table = bench_corruptions.render({"throughput": result["throughput"]}).strip()
    return table + "\n\n" + source("corruptions.json")


@renderer("corruptions.kernels")
def corruptions_kernels() -> str:
    return (
        bench_corruptions.render(load("corruption_kernels.json")).strip()
        + "\n\n"
        + source("corruption_kernels.json")
    )


@renderer("corruptions.memory")
def corruptions_memory() -> str:
    memory = load("corruptions.json")["memory"]
    extra = {name: row["extra_mib"] for name, row in memory["per_corruption"].items()}
    worst = max(extra, key=lambda n: extra[n])
    return (
        f"one severity-{memory['severity']} call on {memory['batch']} frames of {memory['width']}×{memory['height']} "
        f"(input {memory['input_mib']:.0f} MiB, output as much) needs at most {extra[worst]:.0f} MiB above the "
        f"resident set with the input ready (`{worst}`; {min(extra.values()):.0f} MiB at least), "
        f"of which {memory['output_mib']:.0f} MiB is the output"
    )


# --- attacks ----------------------------------------------------------------------------------


@renderer("autoattack.summary")
def autoattack_summary() -> str:
    a = load("autoattack.json")
    ours, ref = a["ours_autoattack_lite"], a["reference_same_three"]
    steps = " / ".join(pct(v) for v in ours["after_each_attack"].values())
    return (
        f"On the first {a['images']} Fashion-MNIST test images ({a['model']}, {pct(a['clean_accuracy'])} clean, "
        f"L-inf eps {a['eps']:g}): ours **{pct(ours['robust_accuracy'])}**, the reference "
        f"**{pct(ref['robust_accuracy'])}** robust ({abs(a['difference_points']):.1f} points apart); ours after "
        f"{' / +'.join(ours['after_each_attack'])}: {steps}; {a['robust_for_reference_only']} images survived the "
        f"reference but not ours, {a['robust_for_ours_only']} the other way; ours "
        f"{sum(ours['seconds'].values()):.0f} s, the reference {ref['seconds']:.0f} s for the same three attacks "
        f"({a['threads']} threads). " + source("autoattack.json")
    )


@renderer("square.summary")
def square_summary() -> str:
    s = load("square.json")
    torch = s.get("torch")
    same = (
        f"; the same attack on PyTorch with the same seed: {pct(torch['accuracy_after'], 1)}"
        f"{' (identical examples)' if torch['identical_to_onnxruntime'] else ''}"
        if torch
        else ""
    )
    return (
        f"Square (L-inf eps {s['attack']['eps'] * 255:.0f}/255, {s['attack']['queries_budget']:,} queries) on "
        f"{s['images']} images against ONNX Runtime ({s['model']}): {s['wall_seconds']:.1f} s, "
        f"{s['queries_per_second']:,.0f} queries/s, {s['mean_queries_per_image']:.0f} queries per image on "
        f"average, accuracy {pct(s['accuracy_before'], 1)} → {pct(s['accuracy_after'], 1)}{same}. "
        + source("square.json")
    )


# --- latency ----------------------------------------------------------------------------------


def _study(arch: str, round_to: int | None) -> dict[str, Any]:
    for study in load("latency_speed.json")["speed"]:
        if study["settings"]["arch"] == arch and study["settings"]["round_to"] == round_to:
            return study
    raise KeyError(f"latency_speed.json has no {arch} study with round_to={round_to}")


def _latency_table(arch: str, round_to: int | None) -> str:
    study = _study(arch, round_to)
    rows = study["rows"]
    batches = sorted({r["batch"] for r in rows})
    header = "| model | precision | MACs reduction | " + " | ".join(
        f"batch {b} p50 / p99 ms | speed-up" for b in batches
    )
    lines = [header + " |", "|---|---|---|" + "---|---|" * len(batches)]
    for model in study["models"]:
        cells = []
        for b in batches:
            r = next(x for x in rows if x["model"] == model["model"] and x["batch"] == b)
            own = f" ({times(r['speedup_vs_fp32'])} its FP32)" if model["precision"] == "int8" else ""
            cells += [f"{r['p50_ms']:.3f} / {r['p99_ms']:.2f}", times(r["speedup_vs_dense"]) + own]
        precision = model["precision"] + (f" {model['scheme']}" if model.get("scheme") else "")
        name = model["model"].removesuffix(f"-int8-{model.get('scheme')}")
        lines.append(
            f"| {name} | {precision} | {times(model['macs_reduction'])} | " + " | ".join(cells) + " |"
        )
    share = max(r.get("other_cpu_share") or 0.0 for r in rows)
    env = study["environment"]
    lines += [
        "",
        f"ONNX Runtime {env['onnxruntime']}, {env['intra_op_threads']} intra-op threads pinned, "
        f"≥ {study['settings']['min_iterations']} timed calls per row, one interleaved run; other processes "
        f"used at most {pct(share, 0)} of the CPUs during these timings. " + source("latency_speed.json"),
    ]
    return "\n".join(lines)


@renderer("latency.resnet18")
def latency_resnet18() -> str:
    return _latency_table("resnet18", 16)


@renderer("latency.mobilenetv2")
def latency_mobilenetv2() -> str:
    return _latency_table("mobilenetv2", 16)


@renderer("latency.mobilenetv2-unrounded")
def latency_mobilenetv2_unrounded() -> str:
    return _latency_table("mobilenetv2", None)


@renderer("latency.int8-accuracy")
def latency_int8_accuracy() -> str:
    a = load("latency_int8_accuracy.json")["int8_accuracy"]
    rows = [
        "| INT8 file (u8s8) | top-1 agreement with FP32 (clean / all inputs) | clean Δ | PGD Δ | corruption Δ |",
        "|---|---|---|---|---|",
    ]
    for name, s in a["summary"].items():
        label = name.removeprefix("int8-").replace("-", ", ")
        rows.append(
            f"| {label} | {pct(s['top1_agreement_clean'])} / {pct(s['top1_agreement_all_inputs'])} | "
            f"{-s['clean_drop_points']:+.1f} | {-s['pgd_drop_points']:+.1f} | {-s['corruption_drop_points']:+.2f} |"
        )
    fp32 = a["evaluations"]["fp32"]
    return "\n".join(
        [
            f"Model: {a['model']['arch']}, {a['model']['pruning']}; trained {a['model']['training']} "
            f"({a['model']['train_seconds']:.0f} s). FP32 on ONNX Runtime: clean {pct(fp32['clean_accuracy'])}, "
            f"mean corruption accuracy {pct(fp32['corruptions']['mean_accuracy'])}.",
            "",
            *rows,
            "",
            "Δ in accuracy points, INT8 minus FP32. " + source("latency_int8_accuracy.json"),
        ]
    )


@renderer("latency.budget")
def latency_budget() -> str:
    rows = [
        "| model | batch | target | MACs reduction chosen | measured | predicted | probes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in load("latency_budget.json")["rows"]:
        measured = times(r["measured_reduction"])
        if not r["target_met"]:
            measured = f"**{measured} (missed)**"
        rows.append(
            f"| {r['arch']} | {r['batch']} | {r['target_latency_reduction']:g}× | {times(r['macs_reduction'])} | "
            f"{measured} | {times(r['predicted_reduction'])} | {len(r['search']['probes'])} |"
        )
    return "\n".join([*rows, "", source("latency_budget.json")])


@renderer("int8.quickstart")
def int8_quickstart() -> str:
    """INT8 files of the quickstart's pruned model, by how they were made (bench/bench_int8.py)."""
    result = load("int8_quickstart.json")
    rows = [
        "| configuration | calibration | method | layers kept FP32 | agreement clean | agreement PGD | "
        "clean drop | PGD drop | speed b1 | speed b32 | INT8 gate (without speed) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        speed = r["speedup"]
        rows.append(
            f"| {r['config']} | {r['calibration']} | {r['method']} | {len(r['fp32_layers'])} | "
            f"{pct(r['clean_agreement'])} | {pct(r['adversarial_agreement'])} | "
            f"{100 * r['clean_drop']:+.1f} | {100 * r['pgd_drop']:+.1f} | {times(speed['1'])} | "
            f"{times(speed['32'])} | {'passes' if r['passes_default_gate_without_speed'] else 'fails'} |"
        )
    searched = [
        f"- `{r['config']}` / {r['calibration']}: FP32 layers each method needed to reach the target on "
        "held-out images (–: not with fewer than the best): "
        + ", ".join(f"{m} {n if n is not None else '–'}" for m, n in r["methods_fp32_layers"].items())
        for r in result["rows"]
        if r.get("methods_fp32_layers")
    ]
    fp32 = result["fp32"]
    return "\n".join(
        [
            f"On {result['validation_images']} validation images; FP32 file: clean "
            f"{pct(fp32['clean_accuracy'])}, PGD-transfer {pct(fp32['adversarial_accuracy'])}. Drops in "
            "accuracy points (FP32 minus INT8); speed is FP32 p50 / INT8 p50 on ONNX Runtime's CPU "
            f"(CPU flags: {', '.join(result['machine']['cpu_flags']) or 'unknown'}).",
            "",
            *rows,
            *(["", *searched] if searched else []),
            "",
            source("int8_quickstart.json"),
        ]
    )


@renderer("int8.qat")
def int8_qat() -> str:
    """QAT files against post-training ones on the quickstart's pruned model (bench/bench_qat.py)."""
    result = load("int8_qat_quickstart.json")
    rows = [
        "| run | file | agreement clean | agreement PGD | clean drop | PGD drop | corruption drop | speed b1 | speed b32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    seen_ptq = False
    for config, run in result["configs"].items():
        for f in run["files"]:
            if f["calibration"] != "qat" and seen_ptq:
                continue  # the post-training files are the same in every run: shown once
            label = (
                f"QAT, {f['qat']['loss']} loss, {f['qat']['epochs']} epochs"
                if f["qat"]
                else (f"post-training, {f['calibration']} calibration, {f['method']}")
            )
            speed = f["speedup"]
            rows.append(
                f"| {config} | {label} | {pct(f['top1_agreement'])} | {pct(f['top1_agreement_adversarial'])} | "
                f"{100 * f['clean_drop']:+.1f} | {100 * f['attack_drop']:+.1f} | {100 * f['corruption_drop']:+.1f} | "
                f"{times(speed['1'])} | {times(speed['32'])} |"
            )
        seen_ptq = True
    return "\n".join([*rows, "", source("int8_qat_quickstart.json")])


@renderer("int8.nncf")
def int8_nncf() -> str:
    """NNCF's ONNX PTQ beside ONNX Runtime's on one FP32 file (bench/bench_nncf_ptq.py)."""
    result = load("int8_nncf.json")
    rows = [
        "| quantiser | agreement clean | agreement PGD | clean drop | PGD drop | integer convs | speed b1 | speed b32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        fusion, speed = r["fusion"], r["speedup"]
        rows.append(
            f"| {r['quantiser']} | {pct(r['clean_agreement'])} | {pct(r['adversarial_agreement'])} "
            f"| {100 * r['clean_drop']:+.1f} | {100 * r['pgd_drop']:+.1f} "
            f"| {fusion['integer_conv']} of {fusion['conv_nodes']} | {times(speed['1'])} | {times(speed['32'])} |"
        )
    fp32 = result["fp32"]
    head = (
        f"{result['calibration_images']} calibration and {result['validation_images']} validation images; "
        f"FP32 file: clean {pct(fp32['clean_accuracy'])}, PGD-transfer {pct(fp32['adversarial_accuracy'])}; "
        f"NNCF {result['nncf']}."
    )
    return "\n".join([head, "", *rows, "", source("int8_nncf.json")])


@renderer("int8.bias-correction")
def int8_bias_correction() -> str:
    """Post-training INT8 files with and without bias correction (bench/bench_bias_correction.py),
    on the same model trained for 4 and for 8 epochs."""
    files = ["int8_bias_correction_e4.json", "int8_bias_correction_e8.json"]
    results = [load(name) for name in files]
    rows = [
        "| training | FP32 clean / PGD-transfer | method | bias correction | agreement clean | "
        "agreement PGD | clean accuracy | mean abs logit error | mean output shift |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        fp32 = result["fp32"]
        for r in result["rows"]:
            rows.append(
                f"| {len(result['train_history'])} epochs | {pct(fp32['clean_accuracy'])} / "
                f"{pct(fp32['adversarial_accuracy'])} | {r['method']} | "
                f"{'on' if r['bias_correction'] else 'off'} | {pct(r['clean_agreement'])} | "
                f"{pct(r['adversarial_agreement'])} | {pct(r['clean_accuracy'])} | "
                f"{r['clean_mean_abs_logit_error']:.3f} | {r['mean_output_shift']:.4f} |"
            )
    first = results[0]
    seconds = {
        on: statistics.median(
            r["write_seconds"] for result in results for r in result["rows"] if r["bias_correction"] == on
        )
        for on in (False, True)
    }
    return "\n".join(
        [
            f"{first['model']}; u8s8 files calibrated on {first['calibration_images']} training images, "
            f"measured on {first['validation_images']} validation images. Mean output shift: mean over "
            "the biased layers and their channels of |INT8 mean − FP32 mean| on the validation images, "
            f"as ONNX Runtime runs the file. Writing a file took {seconds[False]:.1f} s, "
            f"{seconds[True]:.1f} s with bias correction (medians, one thread).",
            "",
            *rows,
            "",
            source(*files),
        ]
    )


_GOAL_COLUMNS = (  # (vs_fp32 metric, column header, cell)
    ("top1_agreement", "agreement clean", pct),
    ("top1_agreement_adversarial", "agreement PGD", pct),
    ("clean_drop", "clean drop", pts),
    ("attack_drop", "PGD drop", pts),
    ("corruption_drop", "corruption drop", pts),
)


def _goal_cell(row: dict[str, Any], metric: str, cell: Any) -> str:
    """The measured value, bold with "missed" when it misses a goal that applies to its row."""
    if row.get(metric) is None:
        return "–"
    text = cell(row[metric])
    goal = row["goals"].get(metric)
    return text if goal is None or goal["met"] else f"**{text} missed**"


def _goal_text(op: str, threshold: float, cell: Any) -> str:
    return f"{'≥' if op == '>=' else '≤'} {cell(threshold).lstrip('+')}"


_CONFIG_ORDER = ("auto", "auto+mixed", "qat", "qat+mixed")


@renderer("int8.goals")
def int8_goals() -> str:
    """Every INT8 configuration held to the INT8 goals, per model (bench/bench_int8_goals.py)."""
    result = load("int8_goals.json")
    speed_goal = result["speed_goal"]
    b = speed_goal["batch"]
    header = ["model", "configuration", "method", "layers kept FP32"]
    header += [title for _, title, _ in _GOAL_COLUMNS] + ["speed b1", f"speed b{b}", "goals met"]
    goal_row = ["goal", "", "", ""]
    goal_row += [_goal_text(*result["goals"][metric], cell) for metric, _, cell in _GOAL_COLUMNS]
    goal_row += ["", f"≥ {times(speed_goal['at_least'], 1)} ({', '.join(speed_goal['cases'])})", ""]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), "| " + " | ".join(goal_row) + " |"]
    notes = []
    for name, case in result["cases"].items():
        fp32 = case["fp32"]
        notes.append(
            f"`{name}`: {times(case['models']['pruned']['macs_reduction'], 1)} fewer MACs than dense; FP32 file "
            f"on {fp32['samples']} validation images: clean {pct(fp32['clean_accuracy'])}, PGD-transfer "
            f"{pct(fp32['pgd_transfer_accuracy'])}, corruptions {pct(fp32['corruption_mean_accuracy'])}"
        )
        for r in sorted(case["rows"], key=lambda r: _CONFIG_ORDER.index(r["config"])):
            speed = r["speedup"] or {}
            speed_goal_row = r["goals"].get(f"speedup_b{b}")
            fast = times(speed[b]) if b in speed else "–"
            if speed_goal_row is not None and not speed_goal_row["met"]:
                fast = f"**{fast} missed**"
            met = [g["met"] for g in r["goals"].values()]
            method = f"{r['qat']['loss']}, {r['qat']['epochs']} epochs" if r["qat"] else r["method"] or "–"
            cells = [name, r["config"], method, str(len(r["fp32_layers"]))]
            cells += [_goal_cell(r, metric, cell) for metric, _, cell in _GOAL_COLUMNS]
            cells += [times(speed["1"]) if "1" in speed else "–", fast, f"{sum(met)} of {len(met)}"]
            rows.append("| " + " | ".join(cells) + " |")
            if r["fp32_layers"]:
                cost = " and ".join(
                    f"{times(c)} at batch {batch}" for batch, c in r["mixed_precision_cost"].items() if c
                )
                notes.append(
                    f"`{name}` {r['config']} keeps in FP32 (most sensitive first): "
                    + ", ".join(f"`{layer}`" for layer in r["fp32_layers"])
                    + (f"; its p50 is {cost} the all-INT8 file's" if cost else "")
                )
    flags = sorted({f for case in result["cases"].values() for f in case["machine"]["cpu_flags"]})
    intro = (
        "Drops in accuracy points (FP32 minus INT8); speed is FP32 p50 / INT8 p50 on ONNX Runtime's CPU "
        f"(CPU flags: {', '.join(flags) or 'unknown'}). A missed goal is in bold."
    )
    return "\n".join([intro, "", *rows, "", *(f"- {n}" for n in notes), "", source("int8_goals.json")])
