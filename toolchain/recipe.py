"""The validated recipe: YAML is only how it is stored.

Every section is a pydantic model with ``extra="forbid"``, so a typo is an error that names the
key. This module stays light to import (pydantic and PyYAML only, no torch).
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from toolchain.errors import RecipeError
from toolchain.recipe_prune import PruneConfig, PruneTarget
from toolchain.recipe_train import (
    AttackConfig,
    MixedNoiseConfig,
    Number,
    Section,
    TrainConfig,
    check_budget,
)

__all__ = [
    "AttackConfig",
    "MixedNoiseConfig",
    "Number",
    "PruneConfig",
    "PruneTarget",
    "Recipe",
    "Section",
    "TrainConfig",
    "load_recipe",
    "recipe_from_dict",
]

RECIPE_VERSION: Literal[1] = 1


#: A registered runtime's name (``exporters.runtimes``: torch, onnxruntime, tensorrt,
#: onnxruntime-cuda, onnxruntime-tensorrt, and any a plugin registers); checked against the
#: registry before a run starts.
Runtime = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]*$")]


class DataConfig(Section):
    """Where the images come from."""

    dataset: str = Field(
        "signs",
        description="signs (procedural traffic signs, no files), fashion-mnist, image-folder, cifar10 (on "
        "disk, never downloaded), driving-scenes (procedural street scenes: per-pixel labels, or boxes "
        "with task: detection), cityscapes (a Cityscapes-layout folder), kitti (image_2/ + label_2/), "
        "coco (an image folder + annotations/instances_*.json)",
    )
    root: str | None = Field(
        None,
        description="dataset folder, where the dataset needs one (image-folder: root/train/<class>/*.png "
        "and root/val/<class>/*.png)",
    )
    image_size: int | None = Field(None, ge=8, description="resize to this square size")
    train_samples: int | None = Field(None, ge=1, description="cap (or, for signs, generate)")
    val_samples: int | None = Field(
        None,
        ge=1,
        description="cap on validation images (for signs and driving-scenes: how many to generate)",
    )
    holdout: int | None = Field(
        None, ge=1, description="validate on images held out from train instead of the test split"
    )
    batch_size: int = Field(64, ge=1, description="training batch size (the global batch under torchrun)")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes")
    seed: int | None = Field(
        None,
        ge=0,
        description="which images the capped splits keep; default the recipe's seed (set it to vary "
        "the training seed while validating on the same images)",
    )


class ModelConfig(Section):
    """Which network: a zoo name, ``torchvision:<name>`` or ``package.module:callable``."""

    arch: str = Field(
        "resnet20",
        description="zoo name (convnet, resnet20, resnet18, vgg11_bn, mobilenetv2, segnet), "
        "torchvision:<name> (weights never downloaded) or package.module:callable (your "
        "factory)",
    )
    width: float = Field(1.0, gt=0, description="channel multiplier for zoo models")
    checkpoint: str | None = Field(None, description="state_dict to start from (weights_only)")


class ExportConfig(Section):
    """ONNX export and the parity check against PyTorch."""

    opset: int = Field(18, ge=13, description="ONNX opset")
    dynamic_batch: bool = Field(True, description="export with a dynamic batch dimension")
    parity_samples: int = Field(
        256, ge=1, description="validation images the export-time parity check runs on"
    )
    parity_atol: float = Field(1e-3, gt=0, description="max |delta logit| allowed for fp32")
    end_to_end: bool = Field(
        False,
        description="detection: also write <model>.e2e.onnx, the network followed by its "
        "post-processing (ONNX NonMaxSuppression), for deployments that take detections from the "
        "engine; robustprune validates the raw-output file and checks this one agrees with it",
    )


class CalibrationMixConfig(Section):
    """Shares of clean, corrupted and adversarial images in the mixed INT8 calibration set."""

    clean: float = Field(0.5, ge=0, description="share of clean training images")
    corrupted: float = Field(
        0.25, ge=0, description="share of corrupted images (quantize.corruptions at quantize.severities)"
    )
    adversarial: float = Field(
        0.25, ge=0, description="share of PGD examples made on the PyTorch model (quantize.attack)"
    )

    @model_validator(mode="after")
    def _not_all_zero(self) -> CalibrationMixConfig:
        if self.clean + self.corrupted + self.adversarial <= 0:
            raise ValueError("at least one share must be > 0")
        return self


class QuantizeGate(Section):
    """Refuse an INT8 file that disagrees with its FP32 file, loses accuracy or is slower.

    On by default (``quantize.gate: null`` turns it off). Agreement is top-1 agreement with the
    FP32 file on the validation images (per pixel for segmentation), clean and PGD-transfer;
    drops are in accuracy (0.01 = one point) against the FP32 file on the same runtime; the
    slowdown is INT8 p50 / FP32 p50 at every benchmarked batch size. Every calibration set's
    file is gated unless ``calibration`` names one. Unset limits are not checked; a metric that
    was not measured fails its gate.
    """

    calibration: Literal["all", "clean", "mixed", "qat"] = Field(
        "all", description="which calibration's files the gates judge (all: every one quantize wrote)"
    )
    min_agreement: float | None = Field(
        0.99,
        ge=0,
        le=1,
        description="smallest top-1 agreement with the FP32 file on clean validation images (classification "
        "and segmentation)",
    )
    min_adversarial_agreement: float | None = Field(
        0.97,
        ge=0,
        le=1,
        description="smallest top-1 agreement with the FP32 file on PGD-transfer images (classification and "
        "segmentation)",
    )
    max_slowdown: float | None = Field(
        1.0,
        gt=0,
        description="largest INT8 p50 / FP32 p50 allowed at any benchmarked batch (null: not checked)",
    )
    max_clean_drop: float | None = Field(
        0.005, ge=0, description="largest clean-accuracy drop against the FP32 file (0.01 = one point)"
    )
    max_pgd_drop: float | None = Field(
        0.01, ge=0, description="largest PGD (transfer) accuracy drop against the FP32 file"
    )
    max_corruption_drop: float | None = Field(
        0.01, ge=0, description="largest mean-corruption accuracy drop against the FP32 file"
    )


#: The keys of ``quantize.qat`` that default to ``finetune``'s: the robust loss and its attack.
QAT_LOSS_KEYS = ("loss", "trades_beta", "adv_weight", "mixed", "distill", "attack")


class QatConfig(TrainConfig):
    """Quantisation-aware fine-tuning (``quantize.qat``): the model trained with INT8 rounding in
    its forward pass, then written as a Q/DQ file with the trained scales.

    A training loop like ``finetune`` (its keys, and the same losses); the loss and its attack
    (``loss``, ``attack``, ``trades_beta``, ``adv_weight``, ``mixed``, ``distill``) default to
    ``finetune``'s, so the robust objective the model was fine-tuned with holds under rounding.
    The distillation losses (``ard``, ``rslad``) learn here from the FP32 model being quantised,
    not the dense one: they train the INT8 model to agree with its own FP32 file.
    """

    epochs: int = Field(2, ge=1, description="QAT epochs (at least 1; leave qat out for none)")
    lr: Number = Field(
        0.001, gt=0, description="peak learning rate of SGD (low: the model is already trained)"
    )
    init: Literal["minmax", "percentile", "entropy", "mse"] = Field(
        "minmax",
        description="how activation scales start: this calibration method's range of each layer's input "
        "and output on the calibration images (quantize.samples clean training images)",
    )
    learn_scales: bool = Field(
        True, description="activation scales are trained with the weights (LSQ); false keeps the initial ones"
    )


class QuantizeConfig(Section):
    """Static INT8 (Q/DQ) quantisation of the exported ONNX files."""

    enabled: bool = Field(False, description="write INT8 Q/DQ files (the quantize stage)")
    models: list[Literal["dense", "pruned"]] = Field(
        ["pruned"], description="which exported models to quantise"
    )
    # One Q/DQ file per target runtime's scheme, and per calibration set (clean and/or the mix).
    targets: list[Literal["onnxruntime", "tensorrt"]] = Field(
        ["onnxruntime"],
        description="one file per target runtime, each with its scheme: onnxruntime -> u8s8 (uint8 "
        "activations, int8 per-channel weights), tensorrt -> s8s8 (symmetric, zero point 0)",
    )
    calibrations: list[Literal["clean", "mixed"]] = Field(
        ["clean", "mixed"],
        description="calibrate on clean images only and/or on the mix; each gives its own file and report "
        "rows ([] with qat set: the QAT files only)",
    )
    samples: int = Field(256, ge=1, description="calibration images, from the training split")
    method: Literal["auto", "minmax", "percentile", "entropy", "mse", "nncf"] = Field(
        "auto",
        description="how activation ranges are chosen: minmax, percentile, entropy (KL), mse (ranges ONNX "
        "Runtime's quantiser applies), nncf (NNCF's post-training quantisation with its bias correction; "
        "onnxruntime target only), or auto: each of `methods`, keeping the one whose file agrees best with "
        "FP32 on held-out clean and PGD-transfer images",
    )
    methods: list[Literal["minmax", "percentile", "entropy", "mse", "nncf"]] = Field(
        ["minmax", "percentile", "entropy", "mse", "nncf"],
        min_length=1,
        description="the methods auto chooses among (nncf is left out for the tensorrt target)",
    )
    holdout_samples: int = Field(
        256,
        ge=16,
        description="training images, none of them calibration images, that auto and target_agreement "
        "measure agreement on (each also as a PGD-transfer image: quantize.attack crafted on the PyTorch "
        "model)",
    )
    target_agreement: float | None = Field(
        None,
        gt=0,
        le=1,
        description="mixed precision: keep the layers whose quantisation costs most agreement in FP32, one "
        "at a time, until held-out top-1 agreement with FP32 reaches this on clean images (null: every "
        "layer INT8); QAT files leave the layers it finds for them in float before training",
    )
    target_adversarial_agreement: float | None = Field(
        None,
        gt=0,
        le=1,
        description="the same target on the held-out PGD-transfer images (null: target_agreement)",
    )
    percentile: float = Field(
        99.99, gt=50, le=100, description="the share of values (in %) the percentile method keeps in range"
    )
    per_channel: bool = Field(True, description="per-channel weight scales")
    bias_correction: bool = Field(
        False,
        description="after writing each post-training file, subtract from every INT8 layer's bias the mean "
        "shift of its output channels against FP32 on the calibration images, measured on the quantised "
        "graph's own inputs (empirical bias correction, Nagel et al. 2019; as NNCF's PTQ)",
    )
    preprocess: bool = Field(
        True,
        description="run ONNX Runtime's quantisation pre-processing first (shape inference, BatchNorm "
        "folding)",
    )
    exclude_nodes: list[str] = Field(
        default_factory=list, description="node names (of the pre-processed graph) kept in float"
    )
    mix: CalibrationMixConfig = CalibrationMixConfig()
    corruptions: list[str] = Field(
        default_factory=lambda: ["gaussian_noise", "motion_blur", "fog", "low_light"],
        description="corruptions of the mixed set's corrupted share",
    )
    severities: list[int] = Field(
        default_factory=lambda: [3], description="severities (1..5) of the mixed set's corrupted share"
    )
    attack: AttackConfig = Field(
        AttackConfig(steps=5, step_size=2 / 255),
        description="the PGD that makes the mixed set's adversarial share",
    )
    qat: QatConfig | None = Field(
        None,
        description="quantisation-aware fine-tuning: one more file per model and target, calibration `qat`, "
        "trained under INT8 rounding with the robust loss and exported with its trained scales (null: off)",
    )
    gate: QuantizeGate | None = Field(
        default_factory=QuantizeGate,
        description="gates refusing an INT8 file that disagrees with its FP32 file, is slower, or loses more "
        "than these margins; on by default (null: no INT8 gate)",
    )

    @property
    def file_calibrations(self) -> list[str]:
        """The calibration of each file per model and target: ``calibrations``, then ``qat``."""
        return [*self.calibrations, *(["qat"] if self.qat is not None else [])]

    @model_validator(mode="after")
    def _consistent(self) -> QuantizeConfig:
        if not self.targets or not self.models:
            raise ValueError("models and targets must not be empty")
        if not self.file_calibrations:
            raise ValueError("calibrations must not be empty (it may be [] when qat is set)")
        if self.qat is not None and not self.enabled:
            raise ValueError("qat writes an INT8 file: it needs quantize.enabled: true")
        if self.gate is not None and self.gate.calibration not in ("all", *self.file_calibrations):
            raise ValueError(
                f"gate.calibration {self.gate.calibration!r} is not in calibrations (or qat, when qat is set)"
            )
        if any(not 1 <= s <= 5 for s in self.severities):
            raise ValueError(f"severities must be 1..5, got {self.severities}")
        if "tensorrt" in self.targets and self.calibrations:
            candidates = self.methods if self.method == "auto" else [self.method]
            if not set(candidates) - {"nncf"}:
                raise ValueError(
                    "method nncf writes files for the onnxruntime target only (NNCF keeps post-ReLU "
                    "activations unsigned; TensorRT takes signed ones): choose a range method (minmax, "
                    "percentile, entropy, mse) or auto with one among methods, or drop tensorrt from targets"
                )
        return self


class EngineConfig(Section):
    """TensorRT engine builds (the ``engine`` stage runs when a runtime list names ``tensorrt``)."""

    precisions: list[Literal["fp32", "fp16", "int8"]] = Field(
        ["fp32"],
        description="TensorRT engines to build: fp32, fp16, int8 (from the s8s8 Q/DQ file: needs "
        "quantize.targets to include tensorrt)",
    )
    min_batch: int = Field(1, ge=1, description="smallest batch of the optimisation profile")
    opt_batch: int = Field(8, ge=1, description="batch the engine is tuned for")
    max_batch: int = Field(32, ge=1, description="largest batch of the optimisation profile")
    workspace_mb: int = Field(1024, ge=1, description="builder workspace in MiB")

    @model_validator(mode="after")
    def _batch_range(self) -> EngineConfig:
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError("need min_batch <= opt_batch <= max_batch")
        return self


class CorruptionSuiteConfig(Section):
    """The corruption suite: which corruptions, at which severities, with which seed."""

    names: list[str] = Field(default_factory=list, description="empty: no corruption suite")
    severities: list[int] = Field(
        default_factory=lambda: [1, 2, 3, 4, 5],
        description="severities (1..5) each corruption is evaluated at",
    )
    seed: int = Field(0, description="seed of the corruptions' random draws (same seed, same pixels)")

    @model_validator(mode="after")
    def _severities_in_range(self) -> CorruptionSuiteConfig:
        bad = [s for s in self.severities if not 1 <= s <= 5]
        if bad:
            raise ValueError(f"severities must be 1..5, got {bad}")
        return self


class EvalAttackConfig(Section):
    """One attack of the validation suite; an unset option keeps the attack's own default."""

    name: str = Field(
        "pgd",
        description="fgsm, pgd, apgd (APGD-CE), apgd-t, square (black-box), autoattack-lite, autoattack "
        "(the reference code, [autoattack] extra); segmentation: pgd, fgsm, apgd, segpgd",
    )
    eps: Number = Field(8 / 255, description="perturbation budget in pixel units (8/255)")
    norm: Literal["linf", "l2"] = Field("linf", description="linf, or l2 for pgd/apgd/apgd-t/autoattack-lite")
    steps: int | None = Field(None, ge=0, description="pgd 20, apgd/apgd-t/autoattack-lite 100")
    step_size: Number | None = Field(None, gt=0, description="pgd step size (default 2.5 * eps / steps)")
    restarts: int = Field(1, ge=1, description="random restarts (pgd, apgd, apgd-t, autoattack-lite)")
    queries: int | None = Field(None, ge=1, description="square 1000, autoattack-lite 5000")
    targets: int | None = Field(None, ge=1, description="apgd-t/autoattack-lite target classes (9)")
    samples: int | None = Field(None, ge=1, description="cap on images attacked")
    seed: int = Field(0, description="seed of random starts and of Square's search")

    @model_validator(mode="after")
    def _budget_in_range(self) -> EvalAttackConfig:
        check_budget(self.eps, self.norm)
        return self


class ValidateConfig(Section):
    """The robustness suite run on every model and runtime."""

    samples: int = Field(500, ge=1, description="validation images evaluated")
    batch_size: int = Field(100, ge=1, description="images per evaluation batch")
    runtimes: list[Runtime] = Field(
        ["torch", "onnxruntime"],
        description="where the suite runs: torch, onnxruntime (the FP32 file and every INT8 file), tensorrt"
        " (the engine stage's engines), onnxruntime-cuda, onnxruntime-tensorrt (ONNX Runtime's "
        "GPU providers)",
    )
    threads: int = Field(2, ge=1, description="ONNX Runtime intra-op threads")
    attacks: list[EvalAttackConfig] = Field(
        default_factory=lambda: [EvalAttackConfig()],
        description="the attacks of the suite, each crafted on PyTorch (white-box) and replayed on every "
        "engine (transfer), or run against each runtime (black-box)",
    )
    corruptions: CorruptionSuiteConfig = CorruptionSuiteConfig()


class BenchConfig(Section):
    """Latency measurement on each exported runtime."""

    enabled: bool = Field(True, description="run the bench stage")
    runtimes: list[Runtime] = Field(
        ["onnxruntime"],
        description="runtimes to time (a runtime this machine lacks stops the run before anything is "
        "written)",
    )
    batch_sizes: list[int] = Field(default_factory=lambda: [1], description="batch sizes to time")
    warmup: int = Field(10, ge=0, description="untimed calls before timing")
    iterations: int = Field(50, ge=1, description="timed calls per file and batch size")
    threads: int = Field(
        2, ge=1, description="ONNX Runtime intra-op threads (and torch's own threads when torch is timed)"
    )


class Gate(Section):
    """One pass/fail rule on a report metric (see the docs' CI gating guide)."""

    metric: str = Field(
        description="dotted path into report.json, list items picked by selectors: "
        "evaluations[model=pruned,runtime=onnxruntime].clean_accuracy"
    )
    op: Literal[">=", ">", "<=", "<", "=="] = Field(
        ">=", description="comparison of the value (or its delta/ratio to the baseline) with the threshold"
    )
    threshold: float = Field(description="the limit")
    relative: Literal["delta", "ratio"] | None = Field(
        None, description="compare value - baseline (delta) or value / baseline (ratio) to the threshold"
    )


# "validate" is the section's name in every recipe; pydantic warns that it shadows the
# deprecated BaseModel.validate classmethod, which nothing here uses.
warnings.filterwarnings("ignore", message='Field name "validate"', category=UserWarning)


class Recipe(Section):
    """A whole run: ``data+model -> train -> prune -> finetune -> export -> quantize -> engine ->
    validate -> bench``."""

    version: Literal[1] = Field(RECIPE_VERSION, description="recipe format version")
    name: str = Field("run", description="run name: the default run directory is runs/<name>")
    seed: int = Field(0, description="seeds model initialisation, shuffling and attacks")
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto (CUDA when available), cpu, cuda[:N]"
    )
    task: str = Field(
        "classification",
        pattern=r"^[a-z][a-z0-9-]*$",
        description="what the model predicts: classification, segmentation or detection (toolchain.tasks)",
    )
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    prune: PruneConfig = PruneConfig()
    finetune: TrainConfig = TrainConfig(epochs=3, lr=0.01)
    export: ExportConfig = ExportConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    engine: EngineConfig = EngineConfig()
    validate: ValidateConfig = ValidateConfig()  # type: ignore[assignment]  # see the filter above
    bench: BenchConfig = BenchConfig()
    gates: list[Gate] = Field(
        default_factory=list,
        description="pass/fail rules on report.json; robustprune run exits 1 when one fails, and when "
        "there are none",
    )
    allow_unverified: bool = Field(
        False,
        description="let a run with no gate, or with no evaluation of an exported file, pass (the "
        "intrinsic gate evaluated-and-gated fails it otherwise); for exploratory runs, never a release",
    )

    @model_validator(mode="before")
    @classmethod
    def _qat_loss_from_finetune(cls, data: Any) -> Any:
        """``quantize.qat`` keeps ``finetune``'s loss and attack unless it sets its own."""
        if not isinstance(data, dict):
            return data
        quantize, finetune = data.get("quantize"), data.get("finetune")
        qat = quantize.get("qat") if isinstance(quantize, dict) else None
        if not isinstance(quantize, dict) or not isinstance(qat, dict) or not isinstance(finetune, dict):
            return data
        inherited = {k: finetune[k] for k in QAT_LOSS_KEYS if k in finetune and k not in qat}
        return {**data, "quantize": {**quantize, "qat": {**inherited, **qat}}}

    @model_validator(mode="after")
    def _dense_training_has_no_teacher(self) -> Recipe:
        if self.train.loss in ("ard", "rslad"):
            raise ValueError(
                f"train.loss {self.train.loss!r} distils from the dense model, which train itself produces: "
                "use it in finetune.loss (or a pruning method's train section) and pgd, trades or hybrid here"
            )
        return self

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise ValueError(
                f"{name!r} must be a plain folder name (letters, digits, '_', '.', '-'; no path separators, "
                "not starting with '.'); choose where the run goes with --out instead"
            )
        return name

    def section_hash(self, *sections: str) -> str:
        """A stable sha256 of the named sections (and the seed), for stage caching."""
        payload = {name: _dump(getattr(self, name)) for name in sections}
        if "data" in payload:
            _drop_unset_data_seed(payload["data"])
        if "quantize" in payload:
            _drop_new_quantize_defaults(payload["quantize"])
        payload["seed"] = self.seed
        return _sha256(payload)

    @property
    def data_seed(self) -> int:
        """The seed that picks the images of capped splits: ``data.seed``, else the recipe's."""
        return self.seed if self.data.seed is None else self.data.seed

    def sha256(self) -> str:
        """The hash of the whole validated recipe (report.json's ``recipe_sha256``).

        A recipe with the default task (or ``allow_unverified`` false, no ``quantize.qat``, or
        ``quantize.bias_correction`` false)
        hashes without that key, as it did before the key existed, so older reports keep
        matching their recipes.
        """
        dump = self.model_dump(mode="json")
        if dump["task"] == "classification":
            del dump["task"]
        if not dump["allow_unverified"]:  # recipes from before the key keep their hash
            del dump["allow_unverified"]
        _drop_unset_data_seed(dump["data"])
        _drop_new_quantize_defaults(dump["quantize"])
        return _sha256(dump)


def _drop_unset_data_seed(data: dict[str, Any]) -> None:
    """An unset ``data.seed`` hashes as if the key did not exist, as before it did (same caches)."""
    if data.get("seed") is None:
        data.pop("seed", None)


def _drop_new_quantize_defaults(quantize: dict[str, Any]) -> None:
    """No ``quantize.qat`` and ``bias_correction`` false hash as before those keys existed (same
    caches, same recipe hashes)."""
    if quantize.get("qat") is None:
        quantize.pop("qat", None)
    if quantize.get("bias_correction") is False:
        quantize.pop("bias_correction", None)


def _dump(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_dump(v) for v in value]
    return value


def _sha256(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe, apply ``section.key=value`` overrides, and validate it.

    Raises:
        RecipeError: the file is missing or unreadable, or the recipe does not validate.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {str(path)!r} not found; pass the path to a YAML recipe")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or _first_line(exc)
        raise RecipeError(
            f"recipe {str(path)!r} is not valid YAML{where}: {problem}; fix the syntax there"
        ) from None
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {str(path)!r} must be a mapping of sections, not {type(raw).__name__}")
    return recipe_from_dict(raw, overrides, source=str(path))


def recipe_from_dict(
    raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = (), source: str = "recipe"
) -> Recipe:
    """Validate a recipe given as a dict (``overrides`` as in :func:`load_recipe`)."""
    raw = json.loads(json.dumps(raw))  # deep copy, and reject non-JSON values early
    for item in overrides:
        _apply_override(raw, item)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(f"{source}: {describe_error(exc)}") from None


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise RecipeError(f"--set {item!r}: write it as section.key=value, e.g. train.epochs=2")
    value = yaml.safe_load(text) if text else None
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"--set {item!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def describe_error(exc: ValidationError) -> str:
    """One line for a recipe's first validation error: where it is and what to do."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    if err["type"] == "extra_forbidden":
        return f"unknown key {where!r}; check the spelling against docs/reference/recipe.md{more}"
    if err["type"] == "literal_error" and err["loc"] == ("version",):
        got = err.get("input")
        return f"unsupported recipe version {got!r}; this robustprune reads version {RECIPE_VERSION}"
    return f"{where}: {err['msg']} (got {err.get('input')!r}){more}"


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
