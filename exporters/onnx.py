"""Export a PyTorch vision model to one self-contained ONNX file, and read such files back.

The exported graph maps ``pixels`` (float32 NCHW in [0, 1]) to ``logits``; normalisation is
part of the model. The file carries its own description in ``metadata_props`` (input range,
shape, classes, mean/std, recipe hash, versions), so a runner or a report never needs the
recipe to interpret it.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import onnx
import torch
from google.protobuf.message import EncodeError
from torch import nn

from exporters.base import InputSpec
from exporters.errors import ExportError, UserError, resource_error
from exporters.parity import ParityResult, check_parity

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "ParityResult",
    "check_parity",
    "export_onnx",
    "load_onnx",
    "onnx_input_spec",
    "read_onnx_metadata",
]

log = logging.getLogger(__name__)

INPUT_NAME = "pixels"
OUTPUT_NAME = "logits"
_BATCH_DIM_NAME = "batch"
# Protobuf cannot serialise a message over 2 GiB; past this the weights go to a side file.
_PROTOBUF_LIMIT = 2**31 - 2**20


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    input_spec: InputSpec,
    opset: int = 18,
    dynamic_batch: bool = True,
    metadata: Mapping[str, Any] | None = None,
    output_names: Sequence[str] | None = None,
) -> Path:
    """Export ``model`` to ONNX at ``path``, checked and with metadata, written atomically.

    The torch.export-based (dynamo) exporter is tried first; if it fails, the TorchScript
    exporter is used and the reason is logged. The model is exported in eval mode on the CPU
    (a copy is made if it lives elsewhere; the caller's module keeps its mode and device).

    Args:
        model: a module mapping float32 ``(N, C, H, W)`` pixels in [0, 1] to ``(N, K)`` logits
            (or ``(N, K, H, W)`` per-pixel logits for segmentation; the axes after the batch
            stay fixed), or to a tuple of tensors with the batch first (a detector's raw heads,
            the first holding the class scores ``(N, ..., K)``).
        path: where to write the ``.onnx`` file; parent folders are created.
        input_spec: channels, height and width; ``input_spec.batch`` is the batch size of a
            fixed-batch export (1 if None).
        opset: ONNX opset of the default domain.
        dynamic_batch: make the batch dimension symbolic (``batch``) instead of fixed.
        metadata: extra ``metadata_props``; non-string values are stored as JSON. Usual keys:
            ``class_names``, ``mean``, ``std``, ``recipe_sha256``, ``model``, ``dataset``.
            The standard keys (``input_range``, ``input_shape``, ``num_classes``,
            ``robustprune_version``, ...) are added unless given.
        output_names: names of the outputs of a model returning a tuple (default ``output0``,
            ``output1``, ...); a single output is always ``logits``.

    Returns:
        The path written.

    Raises:
        ExportError: the model does not return ``(N, K)`` logits, both exporters failed, the
            checker rejected the graph, or ``class_names`` does not match the output width.
    """
    if not isinstance(model, nn.Module):
        raise ExportError(f"export_onnx needs a torch.nn.Module, got {type(model).__name__}")
    path = Path(path)
    batch = 2 if dynamic_batch else (input_spec.batch or 1)  # 2: torch.export specialises 1
    example = torch.rand(input_spec.shape(batch), generator=torch.Generator().manual_seed(0))
    with _eval_on_cpu(model) as cpu_model:
        num_classes, count = _num_classes(cpu_model, example)
        names = _output_names(count, output_names)
        # Metadata is checked before the (slow) export so a bad class list fails fast.
        props = _standard_metadata(input_spec, batch, dynamic_batch, num_classes, opset, names)
        props.update({key: _as_text(value) for key, value in (metadata or {}).items()})
        _check_class_names(props, num_classes)
        proto, props["exporter"] = _export(
            cpu_model, example, opset=opset, dynamic_batch=dynamic_batch, names=names
        )
    onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props}, **props})
    _write_checked(proto, path)
    log.info(
        "exported %s with the %s exporter (opset %d, %d classes)", path, props["exporter"], opset, num_classes
    )
    return path


def load_onnx(path: str | os.PathLike[str], *, load_external_data: bool = True) -> onnx.ModelProto:
    """Load an ONNX file, turning a missing or corrupt file into a one-line :class:`UserError`.

    Raises:
        UserError: the file does not exist or is not a readable ONNX model.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"ONNX file not found: {path}; run the export stage first")
    try:
        return onnx.load(str(path), load_external_data=load_external_data)
    except Exception as exc:  # protobuf raises DecodeError, onnx may raise others
        raise resource_error(exc, f"loading {path}") or UserError(
            f"{path} is not a readable ONNX model ({type(exc).__name__}); re-export it"
        ) from exc


def read_onnx_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """Return the model-level ``metadata_props`` of an ONNX file as a plain dict.

    Raises:
        UserError: the file is missing or not an ONNX model.
    """
    proto = load_onnx(path, load_external_data=False)
    return {prop.key: prop.value for prop in proto.metadata_props}


def onnx_input_spec(path: str | os.PathLike[str]) -> InputSpec:
    """The :class:`InputSpec` of an ONNX file's image input (batch None when symbolic).

    Raises:
        UserError: the file is missing, unreadable, or its input is not a static-size NCHW image.
    """
    proto = load_onnx(path, load_external_data=False)
    initializers = {init.name for init in proto.graph.initializer}
    inputs = [value for value in proto.graph.input if value.name not in initializers]
    if len(inputs) != 1:
        raise UserError(f"{path}: expected exactly one image input, found {len(inputs)}")
    dims = [dim.dim_value if dim.HasField("dim_value") else 0 for dim in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or min(dims[1:]) <= 0:
        shown = [d or "?" for d in dims]
        raise UserError(
            f"{path}: input {inputs[0].name!r} has shape {shown}; expected (N, C, H, W) with fixed C, H, W"
        )
    # A symbolic (dim_param) or unset batch dimension means "any batch size".
    return InputSpec(channels=dims[1], height=dims[2], width=dims[3], batch=dims[0] or None)


# ----------------------------------------------------------------------------- helpers


@contextmanager
def _eval_on_cpu(model: nn.Module) -> Iterator[nn.Module]:
    """Yield ``model`` in eval mode on the CPU, restoring every submodule's training flag after."""
    on_cpu = all(t.device.type == "cpu" for t in (*model.parameters(), *model.buffers()))
    target = model if on_cpu else copy.deepcopy(model).cpu()
    modes = [(module, module.training) for module in model.modules()]
    target.eval()
    try:
        yield target
    finally:
        for module, training in modes:
            module.training = training


def _num_classes(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """Classes of the outputs and how many outputs there are: ``(N, K)`` for a classifier,
    ``(N, K, H, W)`` at the input's ``H x W`` for a segmentation model, a tuple of tensors with
    the batch first for a detector (its first output's last axis holds the classes)."""
    with torch.no_grad():
        out = model(example)
    tensors = isinstance(out, tuple | list) and out and all(isinstance(t, torch.Tensor) for t in out)
    if tensors and all(t.dim() >= 2 and t.shape[0] == example.shape[0] for t in out):
        return int(out[0].shape[-1]), len(out)
    dense = isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[-2:] == example.shape[-2:]
    if not isinstance(out, torch.Tensor) or not (out.dim() == 2 or dense) or out.shape[0] != example.shape[0]:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ExportError(
            f"the model must return logits of shape (N, num_classes) or (N, num_classes, H, W) at the "
            f"input's H x W, or a tuple of tensors with the batch first, got {shape}; wrap it so "
            "forward() returns only those"
        )
    return int(out.shape[1]), 1


def _output_names(count: int, given: Sequence[str] | None) -> list[str]:
    if count == 1:
        return [OUTPUT_NAME]
    names = list(given) if given is not None else [f"output{i}" for i in range(count)]
    if len(names) != count or len(set(names)) != count:
        raise ExportError(f"the model has {count} outputs but {len(names)} distinct output names were given")
    return names


def _export(
    model: nn.Module, example: torch.Tensor, *, opset: int, dynamic_batch: bool, names: list[str]
) -> tuple[onnx.ModelProto, str]:
    """Export with dynamo, falling back to TorchScript; returns the proto and the exporter used."""
    try:
        proto = _export_dynamo(model, example, opset=opset, dynamic_batch=dynamic_batch, names=names)
        fixed = _fixed_batch_values(proto) if dynamic_batch else []
        if not fixed:
            return proto, "dynamo"
        # torch.export may specialise the batch without raising (e.g. torchvision's SSD heads
        # reshape with x.size(0)): the graph would then refuse every other batch size.
        reason = f"it fixed the batch size of {', '.join(fixed)} at {example.shape[0]}"
    except Exception as exc:  # the dynamo stack raises many unrelated types
        reason = _first_line(exc)
        log.debug("dynamo export failure", exc_info=exc)
    log.warning("dynamo ONNX export failed (%s); falling back to the TorchScript exporter", reason)
    try:
        proto = _export_torchscript(model, example, opset=opset, dynamic_batch=dynamic_batch, names=names)
    except Exception as exc2:
        raise ExportError(
            f"ONNX export failed with both exporters: dynamo: {reason}; TorchScript: "
            f"{_first_line(exc2)}; simplify the model's forward() or try another opset"
        ) from exc2
    fixed = _fixed_batch_values(proto) if dynamic_batch else []
    if fixed:
        raise ExportError(
            f"ONNX export could not keep the batch dimension dynamic (dynamo: {reason}; TorchScript "
            f"fixed {', '.join(fixed)}): compute shapes in forward() with -1 or flatten(1) instead of "
            "x.size(0), or export a fixed batch"
        )
    return proto, "torchscript"


def _fixed_batch_values(proto: onnx.ModelProto) -> list[str]:
    """Names of the graph inputs and outputs whose first dimension is a number, not symbolic."""
    return [
        value.name
        for value in [*proto.graph.input, *proto.graph.output]
        if value.type.tensor_type.shape.dim and not value.type.tensor_type.shape.dim[0].dim_param
    ]


def _first_line(exc: BaseException) -> str:
    """``Type: first line`` of an exception; exporter errors run to pages of graph dumps."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _export_dynamo(
    model: nn.Module, example: torch.Tensor, *, opset: int, dynamic_batch: bool, names: list[str]
) -> onnx.ModelProto:
    # f=None keeps everything in memory: no file (and no stray .data file) is written here.
    dynamic_shapes = ({0: torch.export.Dim(_BATCH_DIM_NAME, min=1)},) if dynamic_batch else None
    program = torch.onnx.export(
        model,
        (example,),
        None,
        dynamo=True,
        verbose=False,  # otherwise it prints progress lines to stdout
        input_names=[INPUT_NAME],
        output_names=names,
        opset_version=opset,
        dynamic_shapes=dynamic_shapes,
    )
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    return program.model_proto


def _export_torchscript(
    model: nn.Module, example: torch.Tensor, *, opset: int, dynamic_batch: bool, names: list[str]
) -> onnx.ModelProto:
    axes = {name: {0: _BATCH_DIM_NAME} for name in [INPUT_NAME, *names]} if dynamic_batch else None
    with tempfile.TemporaryDirectory(prefix="robustprune-onnx-") as tmp, warnings.catch_warnings():
        # Its deprecation warning points at this module; the fallback is already logged.
        warnings.simplefilter("ignore", DeprecationWarning)
        target = Path(tmp) / "model.onnx"
        torch.onnx.export(
            model,
            (example,),
            str(target),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=names,
            opset_version=opset,
            dynamic_axes=axes,
        )
        return onnx.load(str(target))  # also pulls in external data, if the exporter wrote any


def _robustprune_version() -> str:
    try:
        return importlib_metadata.version("robustprune")
    except importlib_metadata.PackageNotFoundError:  # running from a source checkout
        return "0+unknown"


def _standard_metadata(
    spec: InputSpec, batch: int, dynamic: bool, num_classes: int, opset: int, names: list[str]
) -> dict[str, str]:
    shape: list[int | str] = [_BATCH_DIM_NAME if dynamic else batch, spec.channels, spec.height, spec.width]
    outputs = {"output_name": names[0]} if len(names) == 1 else {"output_names": json.dumps(names)}
    return {
        "input_name": INPUT_NAME,
        **outputs,
        "input_range": "[0, 1]",
        "input_layout": "NCHW",
        "input_shape": json.dumps(shape),
        "num_classes": str(num_classes),
        "precision": "fp32",
        "opset": str(opset),
        "torch_version": torch.__version__,
        "robustprune_version": _robustprune_version(),
    }


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _check_class_names(props: dict[str, str], num_classes: int) -> None:
    if "class_names" not in props:
        return
    try:
        names = json.loads(props["class_names"])
    except json.JSONDecodeError:
        raise ExportError("metadata class_names must be a list of names (or its JSON)") from None
    if not isinstance(names, list) or len(names) != num_classes:
        count = len(names) if isinstance(names, list) else "not a list"
        raise ExportError(
            f"metadata class_names has {count} entries but the model outputs {num_classes} logits; "
            "pass the dataset's class names in output order"
        )


def exceeds_protobuf_limit(proto: onnx.ModelProto) -> bool:
    """Whether ``proto`` is too large to serialise as one message (its weights must go to a
    side file). Measuring a message serialises it, which itself fails past 2 GiB, so the
    initializers' bytes are summed first and a failed measurement counts as too large."""
    weights = sum(len(t.raw_data) for t in proto.graph.initializer)
    if weights > _PROTOBUF_LIMIT:
        return True
    try:
        return proto.ByteSize() > _PROTOBUF_LIMIT
    except EncodeError:
        return True


def _write_checked(proto: onnx.ModelProto, path: Path) -> None:
    """Check ``proto`` and write it to ``path`` atomically (temporary file, then os.replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    large = exceeds_protobuf_limit(proto)
    try:
        if large:
            # Weights go to <name>.data next to the final file; the .onnx still appears last.
            log.warning("%s exceeds 2 GiB; writing its weights to %s.data", path.name, path.name)
            onnx.save_model(proto, str(tmp), save_as_external_data=True, location=f"{path.name}.data")
            onnx.checker.check_model(str(tmp))
        else:
            onnx.checker.check_model(proto)
            onnx.save_model(proto, str(tmp))
        os.replace(tmp, path)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the exported graph fails the ONNX checker: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
