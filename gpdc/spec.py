"""The declarative spec: what to expand, by how much, and how.

Specs are strict pydantic v2 models loaded from YAML. Unknown keys are errors, and every
validation error carries its field path, so a user sees exactly which line to change.

Ratio precedence for a layer (lowest to highest): ``expand.ratio`` (default) < glob pattern in
``expand.layers`` < exact module name in ``expand.layers``. When several glob patterns match
one layer, the longest pattern wins (ties: the one listed first). A coupled channel group takes
the highest-precedence rule among its member layers; two members set by rules of that same
precedence with different ratios are a conflict (an error that names both layers and the node
that couples them).
"""

from __future__ import annotations

import fnmatch
import math
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import SpecError


_NON_FINITE_HINT = " (YAML reads .inf, .nan and numbers too large for a float, like 1e400, as non-finite)"


class ExpandSpec(BaseModel):
    """How the student is widened into the dynamic teacher (IR, METHOD.md §2)."""

    model_config = ConfigDict(extra="forbid")

    ratio: float = Field(
        2.0,
        description="Default expansion ratio C'/C for every coupled channel group; must be > 1. "
        "Non-integer ratios are allowed (per-channel multiplicities keep the teacher exact).",
    )
    strategy: Literal["replicate", "grow"] = Field(
        "replicate",
        description="'replicate': new channels copy old ones (the paper's IR). "
        "'grow': new channels are fresh and never feed old ones (zero cross-talk, METHOD.md §2.1).",
    )
    layers: dict[str, float] = Field(
        default_factory=dict,
        description="Per-layer ratio overrides. Keys are exact module names (e.g. 'layer4.1.conv2') "
        "or glob patterns (e.g. 'layer4.*'); values are ratios >= 1 (1 keeps that group's width).",
    )
    unwidenable: Literal["student_width", "error"] = Field(
        "student_width",
        description="An op no rule can widen (it mixes or reduces channels, moves them into the batch dim, or is a "
        "leaf module with parameters and no rule): 'student_width' runs it at the student's width in the teacher "
        "(exact; reported as student_width_ops), 'error' stops with what was found (to insist on a fully widened "
        "teacher).",
    )
    free_outputs: list[str] = Field(
        default_factory=list,
        description="Output leaves that may widen (feature outputs for distillation), as globs over their dotted "
        "path ('1.feats.*', 'aux'; a glob may match a trailing part: 'feats.*'). Every other output keeps its width; "
        "the Expansion's output_maps read the student's channels back out of widened ones.",
    )

    @field_validator("ratio")
    @classmethod
    def _ratio_above_one(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError(f"the default expansion ratio must be a finite number > 1, got {v}"
                             f"{_NON_FINITE_HINT}; use e.g. 2.0 or 1.5")
        if not v > 1.0:
            raise ValueError(f"the default expansion ratio must be > 1, got {v}; use e.g. 2.0 or 1.5")
        return v

    @field_validator("layers")
    @classmethod
    def _layer_ratios(cls, v: dict[str, float]) -> dict[str, float]:
        for key, r in v.items():
            if not math.isfinite(r):
                raise ValueError(f"layer rule '{key}' has ratio {r}{_NON_FINITE_HINT}; per-layer ratios must be "
                                 "finite numbers >= 1 (1 keeps the group's width, > 1 widens it)")
            if not r >= 1.0:
                raise ValueError(
                    f"layer rule '{key}' has ratio {r}; per-layer ratios must be >= 1 "
                    "(1 keeps the group's width, > 1 widens it)"
                )
        return v


BranchKind = Literal["kxk", "1x1", "avg", "1x1_kxk", "identity", "dw_1x1"]


class BranchSpec(BaseModel):
    """CBR branches on the teacher's k×k convolutions (METHOD.md §3)."""

    model_config = ConfigDict(extra="forbid")

    kinds: list[BranchKind] = Field(
        default_factory=lambda: ["kxk", "1x1", "1x1_kxk", "avg", "identity"],
        description="Branches every selected k×k conv gets: kxk (the original kernel), 1x1, avg (1x1 then k×k "
        "average pooling), 1x1_kxk, identity (in = out, stride 1), dw_1x1 (groups = 1). [] disables branches. "
        "The original kernel is always kept.",
    )
    layers: str = Field("*", description="Glob over conv module names that get branches (e.g. 'layer*').")


LOGIT_KD = ("none", "hinton", "dkd")


REVIEWKD_RECIPES = {"imagenet": (1.0, 0), "cifar100": (5.0, 20)}  # published (weight, warm-up epochs)


class ReviewKDSpec(BaseModel):
    """ReviewKD (``train.kd: reviewkd``) with the published settings of ``recipe`` unless given: ImageNet's
    (ResNet-34 → ResNet-18: weight 1, no warm-up) or CIFAR-100's (ResNet-32×4 → ResNet-8×4, WRN-40-2 → WRN-16-2:
    weight 5, the weight ramped up over the first 20 epochs)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    recipe: Literal["imagenet", "cifar100"] = Field("imagenet", description="Whose published weight and warm-up "
                                                    "fill those not given.")
    weight: float | None = Field(None, ge=0, description="Weight of the hierarchical context loss "
                          "(default: the recipe's, 1 or 5).")
    warmup_epochs: int | None = Field(None, ge=0, description="The weight grows linearly from 0 over "
                               "these first epochs (default: the recipe's, 0 or 20).")
    mid_channels: int | None = Field(None, ge=1, description="Channels inside the ABF connectors (null: the "
                                     "student's deepest feature's, at most 512, as the reference code).")

    @model_validator(mode="after")
    def _recipe_defaults(self) -> "ReviewKDSpec":
        weight, warmup = REVIEWKD_RECIPES[self.recipe]
        if self.weight is None:
            self.weight = weight
        if self.warmup_epochs is None:
            self.warmup_epochs = warmup
        return self


class FitNetSpec(BaseModel):
    """FitNets hints (``train.kd: fitnet``): weight 100 as in the CRD benchmark code."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    weight: float = Field(100.0, ge=0, description="Weight of the summed feature MSE.")
    warmup_epochs: int = Field(0, ge=0, description="The weight grows linearly from 0 over these first epochs.")


class FeatureSpec(BaseModel):
    """Intermediate tensors for feature distillation (``train.kd: reviewkd | fitnet``), paired in order between
    the student (and so the dynamic teacher, at the same nodes) and the static teacher."""

    model_config = ConfigDict(extra="forbid")

    student: list[str] = Field(default_factory=list, description="Module names ('layer1'), globs within one "
                               "dotted segment ('layer*') or torch.fx node names ('layer1_1_add') of the student.")
    teacher: list[str] | None = Field(None, description="The same for the static teacher (null: the student's names).")


class TrainSpec(BaseModel):
    """GPD training (METHOD.md §4). The CLI overrides the common fields (--epochs, --lr, --batch-size, --seed)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # 1e400 / .inf / .nan: "a finite number"

    epochs: int = Field(30, ge=1, description="Training epochs.")
    batch_size: int = Field(64, ge=1, description="Global batch size (split across DDP ranks).")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="SGD with momentum, or AdamW.")
    lr: float = Field(0.1, gt=0, description="Peak learning rate.")
    momentum: float = Field(0.9, ge=0, description="SGD momentum.")
    weight_decay: float = Field(1e-4, ge=0, description="Weight decay.")
    schedule: Literal["step", "cosine", "warmup_cosine", "constant"] = Field(
        "cosine", description="step: ×gamma at each milestone epoch; cosine; warmup_cosine: linear warm-up then cosine.")
    milestones: list[int] = Field(default_factory=lambda: [30, 60, 90], description="Epochs where 'step' multiplies the lr by gamma.")
    gamma: float = Field(0.1, gt=0, description="Step-schedule factor.")
    warmup_epochs: int = Field(0, ge=0, description="Linear warm-up epochs for warmup_cosine.")
    clip_grad: float | None = Field(5.0, description="Clip the global gradient norm to this value (null: no clipping).")
    ema: float | None = Field(None, description="EMA decay of the trained parameters (e.g. 0.999); evaluation uses the EMA.")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Forward under autocast at this precision (fp16 with a gradient scaler, saved in "
        "last.ckpt); fp32 keeps runs exactly reproducible on CPU.")
    channels_last: bool = Field(False, description="Keep 4-d weights and inputs in channels_last memory format.")
    compile: bool = Field(False, description="torch.compile the training objective (teacher and student together).")
    sync_bn: bool = Field(False, description="In a multi-GPU run, BatchNorm statistics over the global batch "
                          "(torch.nn.SyncBatchNorm, CUDA only); one process has nothing to synchronise.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimiser step: batch_size is split into this "
                            "many forward/backward passes whose gradients add up (DDP syncs once, on the last).")
    gpd: bool = Field(True, description="Train with GPD (dynamic teacher + shared student); false trains the model alone.")
    kd: str = Field("dkd", description="Distillation from the static teacher (when one is given): none, hinton or dkd "
                    "on logits; reviewkd or fitnet (or a registered feature loss) on the features: section's taps.")
    reviewkd: ReviewKDSpec = Field(default_factory=ReviewKDSpec, description="ReviewKD settings.")
    fitnet: FitNetSpec = Field(default_factory=FitNetSpec, description="FitNet settings.")
    kd_temperature: float = Field(4.0, gt=0, description="Hinton KD temperature.")
    dkd_alpha: float = Field(1.0, ge=0, description="DKD target-class weight α.")
    dkd_beta: float = Field(0.5, ge=0, description="DKD non-target weight β (0.5 ResNet-18, 2.0 MobileNet in the paper).")
    dkd_temperature: float = Field(1.0, gt=0, description="DKD temperature.")
    sce_weight: float = Field(3.0, ge=0, description="λ: weight of the dynamic teacher → student soft cross-entropy.")
    sce_label_smoothing: float = Field(0.1, ge=0, lt=1, description="Label smoothing of that soft cross-entropy.")
    sce_temperature: float = Field(1.0, gt=0, description="Temperature of that soft cross-entropy.")
    static_teacher_train_mode: bool = Field(
        False, description="Run the static teacher in train mode like the reference code; eval mode is the sound default.")
    logits: str | None = Field(
        None, description="The student's output leaf that holds the logits, as a dotted path ('0', 'out', 'logits') for "
        "models that return a structure; default: a tensor output, else the one leaf named 'logits' or 'out', else the "
        "first tensor leaf.")
    teacher_logits: str | None = Field(None, description="The same for the static teacher's output.")
    student_grad: Literal["paper", "balanced"] = Field(
        "paper", description="'paper': the student's gradient reaches the shared slice scaled by the IR multiplicity m "
        "(an m² step in student coordinates, the reference behaviour); 'balanced': divided back, a plain step.")

    @field_validator("kd")
    @classmethod
    def _known_kd(cls, v: str) -> str:
        from .feature_kd import FEATURE_LOSSES  # noqa: PLC0415 (torch-side registry)

        known = [*LOGIT_KD, *FEATURE_LOSSES]
        if v not in known:
            raise ValueError(f"unknown distillation '{v}'; use one of {', '.join(known)}")
        return v

    @property
    def feature_kd(self) -> bool:
        """Whether ``kd`` distils features (the spec's ``features:`` taps) rather than logits."""
        return self.kd not in LOGIT_KD


class DataSpec(BaseModel):
    """How ``gpdc train`` reads image data (imagefolder, CIFAR, ``py:``): loader and timm transforms."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    workers: int | None = Field(None, ge=0, description="DataLoader worker processes per rank (null: the cores per rank "
                                "less one, at most 8; 0 decodes on the training process).")
    pin_memory: bool | None = Field(None, description="Pinned host memory for the batches (null: on CUDA).")
    bad_images: Literal["stop", "skip"] = Field(
        "stop", description="An image that cannot be read: 'stop' names it and stops; 'skip' leaves it out and counts "
        "it in the epoch's line.")
    scale: tuple[float, float] = Field((0.08, 1.0), description="Training RandomResizedCrop area range (imagefolder).")
    ratio: tuple[float, float] = Field((0.75, 4 / 3), description="Training RandomResizedCrop aspect range (imagefolder).")
    hflip: float = Field(0.5, ge=0, le=1, description="Horizontal flip probability in training.")
    auto_augment: str | None = Field(None, description="timm auto-augment policy for training, e.g. 'rand-m9-mstd0.5' "
                                     "(imagefolder).")
    re_prob: float = Field(0.0, ge=0, le=1, description="Random erasing probability in training (imagefolder).")
    crop_pct: float = Field(0.875, gt=0, le=1, description="Evaluation: resize the shorter side to size / crop_pct, "
                            "then center-crop (imagefolder).")
    interpolation: Literal["bilinear", "bicubic"] = Field("bilinear", description="Resize interpolation (imagefolder).")
    mean: tuple[float, ...] = Field((0.485, 0.456, 0.406), description="Per-channel normalisation mean (imagefolder).")
    std: tuple[float, ...] = Field((0.229, 0.224, 0.225), description="Per-channel normalisation std (imagefolder).")


class Spec(BaseModel):
    """A gpdc spec: the input the model is traced with and how to expand it."""

    model_config = ConfigDict(extra="forbid")

    input_shape: list[int] = Field(
        [1, 3, 224, 224],
        description="Shape of one example input (batch first) used for tracing and shape propagation.",
    )
    expand: ExpandSpec = Field(default_factory=ExpandSpec, description="Expansion (IR) settings.")
    branches: BranchSpec = Field(
        default_factory=BranchSpec,
        description="CBR branches on k×k convs; absent: the paper's default set; `kinds: []` disables them.",
    )
    train: TrainSpec = Field(default_factory=TrainSpec, description="GPD training settings (gpdc train).")
    data: DataSpec = Field(default_factory=DataSpec, description="Data loading and transforms (gpdc train).")
    features: FeatureSpec = Field(default_factory=FeatureSpec, description="Feature taps for feature distillation.")

    @field_validator("input_shape")
    @classmethod
    def _positive_shape(cls, v: list[int]) -> list[int]:
        if not v or any(d <= 0 for d in v):
            raise ValueError(f"input_shape must be a non-empty list of positive sizes, got {v}")
        return v


def _format_validation_error(err: ValidationError, source: str) -> str:
    parts = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key; remove it or check its spelling (see `gpdc spec --schema`)"
        parts.append(f"{path}: {msg}")
    return f"invalid spec {source}: " + "; ".join(parts) + "."


def with_overrides(train: "TrainSpec", overrides: dict) -> "TrainSpec":
    """The spec's train section with values from the command line, validated as if the spec held them (``--epochs 0``
    is as wrong as ``epochs: 0``)."""
    try:
        return TrainSpec.model_validate(train.model_dump() | overrides)
    except ValidationError as e:
        given = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in overrides.items())
        raise SpecError(_format_validation_error(e, f"with the command line's {given}")) from None


def load_spec(spec: "Spec | dict | str | Path | None") -> Spec:
    """Return a validated ``Spec`` from a Spec, a dict, or a path to a YAML file."""
    if spec is None:
        return Spec()
    if isinstance(spec, Spec):
        return spec
    source = "(dict)"
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        source = str(path)
        if path.is_dir():
            raise SpecError(f"spec file {path} is a folder, not a file; pass the path of a YAML spec such as "
                            "specs/r18.yaml.")
        if not path.is_file():
            raise SpecError(f"spec file {path} does not exist; pass the path of a YAML spec such as specs/r18.yaml.")
        try:
            text = path.read_text(encoding="utf-8-sig")  # a BOM is fine
        except UnicodeDecodeError as e:
            raise SpecError(f"spec file {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                            "save it as UTF-8 YAML.") from None
        except OSError as e:
            raise SpecError(f"cannot read spec file {path} ({e.strerror}); check its permissions.") from None
        try:
            spec = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise SpecError(f"spec file {path} is not valid YAML ({e}); fix the syntax at the line shown.") from None
    if not isinstance(spec, dict):
        raise SpecError(f"spec {source} must be a mapping at the top level, got {type(spec).__name__}.")
    try:
        return Spec.model_validate(spec)
    except ValidationError as e:
        raise SpecError(_format_validation_error(e, source)) from None


def is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def match_layer(name: str, rules: dict[str, float]) -> tuple[str, str, float] | None:
    """The highest-precedence layer rule for module ``name``: (level, key, ratio) or None.

    level is 'exact' or 'glob'."""
    if name in rules:
        return ("exact", name, rules[name])
    best = None
    for key, r in rules.items():
        if is_glob(key) and fnmatch.fnmatchcase(name, key):
            if best is None or len(key) > len(best[1]):
                best = ("glob", key, r)
    return best
