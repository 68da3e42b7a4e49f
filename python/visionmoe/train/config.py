"""Training configuration: a dataclass of typed fields, read from YAML with ``key=value`` overrides and validated
with errors that name the offending key."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

import yaml


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run needs; a YAML config file sets any subset of these keys.

    Attributes:
        model: registry name for :func:`visionmoe.models.create_model`.
        model_options: keyword arguments for the model entrypoint (e.g. ``embed_dim``, ``depth``, ``moe``);
            ``num_classes`` defaults to the training set's ``num_classes``.
        dataset: name for :func:`visionmoe.data.create_dataset`.
        data_root: directory of the data set's local files (for data sets that read files).
        dataset_options: further keyword arguments for ``create_dataset``.
        train_split, val_split: split names passed to ``create_dataset``.
        epochs: passes over the training set.
        batch_size: images per optimiser step (and per evaluation batch), over all processes together: each of W
            ranks takes batch_size / W of them.
        lr: peak learning rate of AdamW, reached at the end of the warm-up.
        min_lr: learning rate at the end of the cosine decay.
        weight_decay: AdamW's decoupled weight decay.
        warmup_epochs: length of the linear warm-up, in epochs (fractions allowed); the cosine decay follows.
        grad_clip: maximum global gradient norm; null disables clipping.
        label_smoothing: of the cross-entropy loss.
        aux_loss_weights: weight of each router auxiliary loss by name (as reported by
            :func:`visionmoe.layers.aux_losses`, e.g. ``importance``, ``load``); losses without a weight are
            logged but not trained on.
        seed: seeds Python, NumPy and torch, the model initialisation and the data order.
        output_dir: receives ``metrics.csv``, TensorBoard logs and ``checkpoint/``.
        device: "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N".
        amp: mixed precision: bfloat16 autocast (CPU, and CUDA where supported), else float16 autocast with a
            gradient scaler on CUDA.
        num_workers: DataLoader worker processes.
        progress: show the tqdm progress bar.
        tensorboard: write TensorBoard logs (skipped with a note when the tensorboard package is missing).
        log_steps: also write ``steps.csv`` with one row per optimiser step.
        teacher: teacher-guided routing (TGR-MoE, PAPERS.md section 4): a checkpoint directory of a dense model
            (loaded with :func:`visionmoe.train.load_model`) whose blocks at the student's MoE layer indices feed a
            :class:`~visionmoe.layers.TeacherRouter`; null trains without a teacher.
        tgr_weight: weight of the routing distillation loss, the mean over MoE layers of KL(p_teacher || p_student)
            (the paper's 5.0 / |S| * sum over layers).
        tgr_schedule: when the distillation is on: "full" (the whole run), "first_half", or a fraction in (0, 1]
            of the optimiser steps, counted from the start.
        tgr_pretrain_epochs: 0 trains the teacher router jointly with the student; n > 0 pre-trains it alone for
            n epochs of the training set before the student's first step, then freezes it.
        consistency_probe: record the routing consistency (``routing_consistency.csv``/``.json``) on the first
            this many validation images, before training and after every epoch; 0 disables it.
        init_from: fine-tuning: a training output or checkpoint directory whose model weights start this run
            (the optimiser, schedule and epoch count start afresh). Weights whose shape differs here, such as a
            classifier head for another number of classes, keep their fresh initialisation; any other mismatch
            is an error. With ``consistency_probe``, the snapshot before training is the pre-trained routing
            (phase "pretrain") and the epochs' are phase "finetune", so the consistency report includes each
            epoch's agreement with the pre-trained routing.
        expert_parallel: under torchrun with several processes, the number of ranks each MoE layer's experts are
            sharded over (it must divide the world size and every layer's E); 1 is plain data parallelism. Ignored
            in a single process.
        drop_last: leave out the last training batch of an epoch when it holds fewer than ``batch_size`` images;
            null (the default) drops it when training on several processes, which cannot split it evenly. A run
            keeps the choice it started with when resumed, so it resumes with the same steps on any world size.
    """

    model: str = "vmoe_tiny_32"
    model_options: Dict[str, Any] = dataclasses.field(default_factory=dict)
    dataset: str = "digits"
    data_root: Optional[str] = None
    dataset_options: Dict[str, Any] = dataclasses.field(default_factory=dict)
    train_split: str = "train"
    val_split: str = "test"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 0.0
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    grad_clip: Optional[float] = 1.0
    label_smoothing: float = 0.0
    aux_loss_weights: Dict[str, float] = dataclasses.field(default_factory=lambda: {"importance": 0.005, "load": 0.005})
    seed: int = 0
    output_dir: str = "runs/train"
    device: str = "auto"
    amp: bool = False
    num_workers: int = 0
    progress: bool = True
    tensorboard: bool = True
    log_steps: bool = False
    teacher: Optional[str] = None
    tgr_weight: float = 5.0
    tgr_schedule: str | float = "full"
    tgr_pretrain_epochs: int = 0
    consistency_probe: int = 0
    init_from: Optional[str] = None
    expert_parallel: int = 1
    drop_last: Optional[bool] = None

    def __post_init__(self):
        validate(self)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


_FIELDS = {field.name: field for field in dataclasses.fields(TrainConfig)}
# The type each key accepts, and whether null is allowed; ints are accepted where floats are expected.
_TYPES = {
    "model": (str, False),
    "model_options": (dict, False),
    "dataset": (str, False),
    "data_root": (str, True),
    "dataset_options": (dict, False),
    "train_split": (str, False),
    "val_split": (str, False),
    "epochs": (int, False),
    "batch_size": (int, False),
    "lr": (float, False),
    "min_lr": (float, False),
    "weight_decay": (float, False),
    "warmup_epochs": (float, False),
    "grad_clip": (float, True),
    "label_smoothing": (float, False),
    "aux_loss_weights": (dict, False),
    "seed": (int, False),
    "output_dir": (str, False),
    "device": (str, False),
    "amp": (bool, False),
    "num_workers": (int, False),
    "progress": (bool, False),
    "tensorboard": (bool, False),
    "log_steps": (bool, False),
    "teacher": (str, True),
    "tgr_weight": (float, False),
    "tgr_schedule": ((str, float), False),
    "tgr_pretrain_epochs": (int, False),
    "consistency_probe": (int, False),
    "init_from": (str, True),
    "expert_parallel": (int, False),
    "drop_last": (bool, True),
}
TGR_SCHEDULES = {"full": 1.0, "first_half": 0.5}
assert set(_TYPES) == set(_FIELDS), "every TrainConfig field needs an entry in _TYPES"


def _is_type(value: Any, expected: type | tuple) -> bool:
    if isinstance(expected, tuple):
        return any(_is_type(value, option) for option in expected)
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, expected)


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading exponent notation without a dot or without an exponent sign (``1e-3``,
    ``1e30``, ``1.5e3``) as a float, as YAML 1.2 does: YAML 1.1 reads it as a string, which would reach nested
    options such as ``model_options.moe.capacity_factor`` unchecked."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def _yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML error on one line (PyYAML's message quotes the offending text over several lines)."""
    mark, problem = getattr(error, "problem_mark", None), getattr(error, "problem", None)
    if problem is None:
        return " ".join(str(error).split())
    return problem if mark is None else f"{problem} at line {mark.line + 1}, column {mark.column + 1}"


def _check_types(config: TrainConfig) -> None:
    for key, (expected, nullable) in _TYPES.items():
        value = getattr(config, key)
        if value is None and nullable:
            continue
        if not _is_type(value, expected):
            options = expected if isinstance(expected, tuple) else (expected,)
            names = " or ".join(option.__name__ for option in options)
            raise ValueError(
                f"config key {key!r} must be {'null or ' if nullable else ''}{names}, "
                f"got {type(value).__name__} {value!r}"
            )
        # inf and nan pass the range checks below (inf > 0) or would turn the run's losses into nan.
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"config key {key!r} must be a finite number, got {value!r}")
    for name, weight in config.aux_loss_weights.items():
        if not _is_type(weight, float) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"config key 'aux_loss_weights.{name}' must be a finite number >= 0, got {weight!r}")


def validate(config: TrainConfig) -> None:
    """Raises ValueError naming the first key of ``config`` with a wrong type or an out-of-range value."""
    _check_types(config)
    bounds = [
        ("epochs", config.epochs >= 1, ">= 1"),
        ("batch_size", config.batch_size >= 1, ">= 1"),
        ("lr", config.lr > 0, "> 0"),
        ("min_lr", 0 <= config.min_lr <= config.lr, "in [0, lr]"),
        ("weight_decay", config.weight_decay >= 0, ">= 0"),
        ("warmup_epochs", 0 <= config.warmup_epochs <= config.epochs, "in [0, epochs]"),
        ("grad_clip", config.grad_clip is None or config.grad_clip > 0, "> 0 or null"),
        ("label_smoothing", 0 <= config.label_smoothing < 1, "in [0, 1)"),
        ("num_workers", config.num_workers >= 0, ">= 0"),
        ("tgr_weight", config.tgr_weight >= 0, ">= 0"),
        ("tgr_pretrain_epochs", config.tgr_pretrain_epochs >= 0, ">= 0"),
        ("consistency_probe", config.consistency_probe >= 0, ">= 0 (0 disables it)"),
        ("expert_parallel", config.expert_parallel >= 1, ">= 1 (1: data parallelism only)"),
        # The per-epoch generators are seeded with about seed * 2**21, which must fit torch's 64 bits.
        ("seed", 0 <= config.seed < 2**32, "in [0, 2**32)"),
    ]
    for key, ok, requirement in bounds:
        if not ok:
            raise ValueError(f"config key {key!r} must be {requirement}, got {getattr(config, key)!r}")
    if config.device != "auto" and config.device != "cpu" and not config.device.startswith("cuda"):
        raise ValueError(f"config key 'device' must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {config.device!r}")
    tgr_fraction(config.tgr_schedule)
    if not config.output_dir.strip():
        raise ValueError(
            "config key 'output_dir' must be a directory, got an empty string (write '.' for the current directory)"
        )
    if config.teacher is not None and not config.teacher.strip():
        raise ValueError("config key 'teacher' must be a checkpoint directory or null, got an empty string")


def tgr_fraction(schedule: str | float) -> float:
    """The fraction of the optimiser steps, from the start, during which the routing distillation is on, for a
    ``tgr_schedule`` value: "full" 1, "first_half" 0.5, or a number (or numeric string) in (0, 1]."""
    if isinstance(schedule, str) and schedule in TGR_SCHEDULES:
        return TGR_SCHEDULES[schedule]
    fraction = schedule
    if isinstance(schedule, str):  # the --tgr-schedule flag gives its number as text
        try:
            fraction = float(schedule)
        except ValueError:
            pass
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(
            f"config key 'tgr_schedule' must be 'full', 'first_half' or a fraction in (0, 1], got {schedule!r}"
        )
    return float(fraction)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=value"`` -> (["a", "b"], value parsed as a YAML scalar, so 3 is an int, 1e-3 a float, null None)."""
    key, separator, raw_value = text.partition("=")
    if not separator or not key.strip():
        raise ValueError(f"override must look like key=value, got {text!r}")
    path = key.strip().split(".")
    if not raw_value.strip():
        return path, ""
    try:
        return path, yaml.load(raw_value, Loader=_YamlLoader)
    except yaml.YAMLError as error:
        raise ValueError(f"the value of override {text!r} is not valid YAML: {_yaml_problem(error)}") from error


def apply_overrides(values: Dict[str, Any], overrides: Iterable[str]) -> Dict[str, Any]:
    """``values`` with each ``key=value`` override set; dotted keys reach into the dictionary-valued keys."""
    values = {key: dict(value) if isinstance(value, dict) else value for key, value in values.items()}
    for override in overrides:
        path, value = parse_override(override)
        if path[0] not in _FIELDS:
            raise ValueError(f"unknown config key {path[0]!r} in override {override!r}")
        target = values
        for depth, part in enumerate(path[:-1]):
            if depth == 0 and _TYPES[part][0] is not dict:
                raise ValueError(f"config key {part!r} is not a mapping, so {override!r} cannot set a sub-key")
            child = target.get(part)
            if child is None:
                child = target[part] = {}
            elif not isinstance(child, dict):
                raise ValueError(f"{'.'.join(path[: depth + 1])!r} is not a mapping in override {override!r}")
            target = child
        target[path[-1]] = value
    return values


def config_from_dict(values: Dict[str, Any], overrides: Iterable[str] = ()) -> TrainConfig:
    """A validated TrainConfig from a dictionary of keys (unknown keys are rejected) and overrides."""
    if not isinstance(values, dict):
        raise ValueError(f"a config must be a mapping of keys to values, got {type(values).__name__}")
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}; known keys: {', '.join(_FIELDS)}")
    defaults = {name: getattr(TrainConfig(), name) for name in _FIELDS}
    merged = apply_overrides({**defaults, **values}, overrides)
    return TrainConfig(**merged)


def read_config_file(path: Optional[str | Path]) -> Dict[str, Any]:
    """The keys the YAML file at ``path`` sets, unvalidated ({} when None)."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    with path.open("rb") as file:  # bytes: PyYAML decodes them and reports bad UTF-8 as a YAML error
        try:
            values = yaml.load(file, Loader=_YamlLoader) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"config file {str(path)!r} is not valid YAML: {_yaml_problem(error)}") from error
    if not isinstance(values, dict):
        raise ValueError(f"config file {str(path)!r} must be a mapping of keys to values, got {type(values).__name__}")
    return values


def load_config(path: Optional[str | Path] = None, overrides: Iterable[str] = ()) -> TrainConfig:
    """The config of the YAML file at ``path`` (defaults when None) with ``overrides`` applied."""
    return config_from_dict(read_config_file(path), overrides)


def save_config(config: TrainConfig, path: str | Path) -> None:
    with Path(path).open("w") as file:
        yaml.safe_dump(config.to_dict(), file, sort_keys=False)
