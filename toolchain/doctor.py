"""``robustprune doctor``: what this machine can do, and what a recipe would need from it."""

from __future__ import annotations

from typing import Any

from toolchain.recipe import Recipe

__all__ = ["recipe_needs", "render_doctor"]


def _need(what: str, ok: bool, detail: str, *, required: bool = True) -> dict[str, Any]:
    return {"need": what, "ok": ok, "required": required, "detail": detail}


def recipe_needs(recipe: Recipe, machine: dict[str, Any]) -> list[dict[str, Any]]:
    """Each thing ``recipe`` needs from the machine, whether it is there, and why not.

    Args:
        recipe: a validated recipe.
        machine: :func:`toolchain.machine.probe`'s answer.

    Returns:
        ``[{"need", "ok", "required", "detail"}]``; a need with ``required: False`` is advice
        (the run works, but slower or with less).
    """
    from exporters.runtimes import runtime_available

    needs = []
    if recipe.device != "cpu":
        cuda = bool(machine.get("cuda_available"))
        detail = f"{len(machine.get('gpus', []))} GPU(s)" if cuda else "CUDA is not available"
        if recipe.device == "auto":
            detail += "; device auto trains on the CPU without it"
        needs.append(_need(f"device: {recipe.device}", cuda, detail, required=recipe.device != "auto"))
    runtimes = {("validate", r) for r in recipe.validate.runtimes}
    if recipe.bench.enabled:
        runtimes |= {("bench", r) for r in recipe.bench.runtimes}
    for section, runtime in sorted(runtimes):
        reason = runtime_available(runtime)
        needs.append(_need(f"{section}: runtime {runtime}", reason is None, reason or "available"))
    quantize = recipe.quantize
    if quantize.enabled:
        cpu = machine["cpu"]
        if "onnxruntime" in quantize.targets:
            needs.append(
                _need(
                    "quantize: fast CPU INT8 (VNNI)",
                    bool(cpu["vnni"]),
                    "INT8 dot-product instructions: "
                    + (", ".join(cpu["int8_instructions"]) or "none")
                    + ("" if cpu["vnni"] else "; without VNNI the INT8 model may be slower than FP32"),
                    required=False,
                )
            )
        if "tensorrt" in quantize.targets:
            reason = runtime_available("tensorrt")
            needs.append(
                _need(
                    "quantize: a TensorRT to run the s8s8 file",
                    reason is None,
                    reason or "available",
                    required=False,
                )
            )
    block = machine["cpu"].get("nchwc_block")
    round_to = recipe.prune.round_to
    uses_ort_cpu = "onnxruntime" in recipe.bench.runtimes or "onnxruntime" in recipe.validate.runtimes
    if block and uses_ort_cpu:
        ok = bool(round_to) and round_to % block == 0
        needs.append(
            _need(
                f"prune.round_to a multiple of {block} (ONNX Runtime CPU NCHWc block)",
                ok,
                f"round_to is {round_to}; pruned channel counts that are not multiples of {block} lose "
                "ONNX Runtime's blocked convolution kernels and much of the MACs speed-up",
                required=False,
            )
        )
    return needs


def render_doctor(machine: dict[str, Any], needs: list[dict[str, Any]] | None) -> str:
    """The text ``robustprune doctor`` prints."""
    cpu = machine["cpu"]
    lines = [
        f"torch            {machine['torch']} (CUDA build: {machine['torch_cuda_build'] or 'none'})",
        f"CUDA available   {'yes' if machine['cuda_available'] else 'no'}",
        f"GPUs             {', '.join(machine['gpus']) or 'none'}",
        f"onnxruntime      {machine['onnxruntime']}; "
        f"providers: {', '.join(machine['onnxruntime_providers'])}",
        f"TensorRT         {machine['tensorrt'] or 'not installed'}",
        f"trtexec          {machine['trtexec'] or 'not on PATH'}",
        f"CPU INT8         {', '.join(cpu['int8_instructions']) or 'no VNNI/dot-product instructions'}"
        f" (VNNI: {'yes' if cpu['vnni'] else 'no'}; NCHWc block: {cpu['nchwc_block'] or 'n/a'})",
        f"CPU threads      {cpu['threads_available']}",
    ]
    if needs is not None:
        lines.append("")
        lines.append("recipe needs:")
        for need in needs:
            mark = "ok  " if need["ok"] else ("MISS" if need["required"] else "warn")
            lines.append(f"  [{mark}] {need['need']}: {need['detail']}")
    return "\n".join(lines)
