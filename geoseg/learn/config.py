"""Training configuration: a validated pydantic model, loaded from YAML or built in Python.

Every key is checked when the file is read; an error names the file, the key, what is wrong and, for a
choice or an unknown key, the allowed values, on one line (:class:`geoseg.errors.ConfigError`).
Relative paths in a YAML file are relative to that file's folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from geoseg.errors import ConfigError
from geoseg.io.settings import format_validation_error, read_yaml_file, resolve_path

LOSS_NAMES = ("cross_entropy", "dice", "jaccard", "focal", "lovasz")
LOSS_ALIASES = {"ce": "cross_entropy", "crossentropy": "cross_entropy", "iou": "jaccard", "bce": "cross_entropy"}

_DEFAULT_COLORS = [
    (0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ClassConfig(_Strict):
    """One class: the id in the label data (and in the class map), its name and colour."""

    id: int = Field(ge=0, le=65534)
    name: str
    color: tuple[int, int, int] | None = None

    @field_validator("color")
    @classmethod
    def _rgb(cls, v: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        from geoseg.model.contract import check_rgb

        return None if v is None else check_rgb(v)


class SceneConfig(_Strict):
    """One training scene: an image and its labels.

    ``labels`` is a raster (class ids; reprojected onto the image grid when its grid differs) or a vector
    file (GPKG, SHP, GeoJSON...) whose polygons are reprojected and rasterised onto the image grid.
    """

    image: str
    labels: str
    label_column: str | None = Field(
        default=None, description="vector labels: column holding class ids or class names")
    label_value: int | None = Field(
        default=None, description="vector labels without a column: the class id every polygon gets")
    split: Literal["auto", "train", "val", "test"] = Field(
        default="auto", description="'auto' splits the scene into blocks; otherwise the whole scene goes to one split")


class DataConfig(_Strict):
    """Scenes, bands, chips, samplers and splits."""

    scenes: list[SceneConfig] = Field(min_length=1)
    bands: list[int] | None = Field(default=None, description="1-based scene band numbers; default all bands")
    band_names: list[str] | None = None
    chip_size: int = Field(default=256, ge=16, description="model input size; unset: 256, or smaller to fit "
                                                             "small scenes (half their shorter side)")
    overlap: int | None = Field(default=None, ge=0, description="overlap recorded for prediction; default chip/4")
    sampler: Literal["random", "grid"] = "random"
    samples_per_epoch: int | None = Field(default=None, ge=1, description="training chips per epoch (random sampler)")
    val_fraction: float = Field(default=0.2, ge=0.0, lt=1.0)
    test_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    split_block: int | None = Field(default=None, ge=16, description="side of the split blocks in pixels; default one chip")
    min_valid_fraction: float = Field(default=0.5, ge=0.0, le=1.0, description="skip chips with less valid imagery")
    min_labelled_fraction: float = Field(default=0.01, ge=0.0, le=1.0, description="skip chips with fewer labels")
    label_nodata: int | None = Field(default=None, description="label value meaning 'unlabelled'; default the label raster's nodata")
    stats_max_pixels: int = Field(default=50_000_000, ge=1000, description="pixels read for normalisation statistics")
    mean: list[float] | None = Field(default=None, description="fixed normalisation (raw units) instead of computed")
    std: list[float] | None = None
    workers: int = Field(default=0, ge=0, description="DataLoader worker processes")

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must leave some data for training")
        if self.overlap is not None and self.overlap * 2 > self.chip_size:
            raise ValueError(f"overlap {self.overlap} must be at most half of chip_size {self.chip_size}")
        if self.band_names is not None and self.bands is not None and len(self.band_names) != len(self.bands):
            raise ValueError(f"band_names has {len(self.band_names)} names for {len(self.bands)} bands")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std, or neither")
        return self


class ModelConfig(_Strict):
    """The network: any architecture of :mod:`geoseg.model.networks` (all smp architectures) and encoder by name."""

    architecture: str = "unet"
    encoder: str | None = "resnet34"
    encoder_weights: str | None = Field(
        default=None, description="pretrained encoder: 'imagenet' (downloads), or a local .safetensors/.pth file "
                                  "(an smp encoder's keys, a tu- encoder's model.* keys, or a whole network's "
                                  "encoder.* keys); its metadata names the encoder and its bands")
    params: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments of the architecture")
    activation: Literal["softmax", "sigmoid"] = "softmax"
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="channel dropout before the segmentation head")
    normalization: Literal["data", "pretrained"] = Field(
        default="data", description="input statistics: 'data' (per band, from the training pixels) or "
                                    "'pretrained' (those the encoder_weights file expects, for the bands it has)")
    pretrained_scale: float | None = Field(
        default=None, gt=0, description="normalization 'pretrained': raw units per unit of the weights' input "
                                        "(255 for 8-bit imagery against ImageNet's 0..1, 10000 for Sentinel-2 "
                                        "digital numbers against reflectance); unset: 255 for 8-bit scenes, "
                                        "10000 for 16-bit ones, 1 otherwise")
    freeze_bn: bool = Field(default=False, description="keep the encoder's BatchNorm statistics and affine "
                                                       "parameters as pretrained")
    freeze_encoder_fraction: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="train only the decoder for this share of the run (steps or "
                                                 "time budget), then the whole network")

    @field_validator("architecture")
    @classmethod
    def _arch(cls, v: str) -> str:
        from geoseg.errors import unknown_name
        from geoseg.model.networks import architecture_names

        known = architecture_names()
        if v.lower().replace("-", "").replace("_", "") not in known:
            raise ValueError(str(unknown_name("architecture", v, list(known))))
        return v


    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.normalization == "pretrained" and not self.encoder_weights:
            raise ValueError("normalization 'pretrained' needs model.encoder_weights")
        return self


class LossTerm(_Strict):
    """One term of the loss: a name from the registry, its weight and keyword arguments."""

    name: str
    weight: float = Field(default=1.0, gt=0)
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        key = LOSS_ALIASES.get(v.lower(), v.lower())
        if key not in LOSS_NAMES:
            raise ValueError(f"unknown loss {v!r}; valid names: {', '.join(LOSS_NAMES)}")
        return key


class OptimizerConfig(_Strict):
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    schedule: Literal["none", "cosine", "onecycle"] = "onecycle"
    grad_clip: float | None = Field(default=1.0, gt=0, description="max gradient norm; null disables clipping")
    encoder_lr_scale: float = Field(default=1.0, gt=0, le=1, description=(
        "the encoder's learning rate as a share of lr (e.g. 0.1 for a pretrained encoder)"))
    warmup: float | None = Field(default=None, ge=0, lt=1, description=(
        "share of the run the rate warms up over (from lr/25); unset: 0.3 for onecycle, none otherwise"))
    ema: float | None = Field(default=None, gt=0, lt=1, description=(
        "decay of an exponential moving average of the weights (e.g. 0.99): validation scores the average and "
        "the bundle keeps it; null: the raw weights"))


class AugmentConfig(_Strict):
    """Augmentations applied to image and mask together (any band count)."""

    enabled: bool = True
    hflip: float = Field(default=0.5, ge=0, le=1)
    vflip: float = Field(default=0.5, ge=0, le=1)
    rot90: float = Field(default=0.5, ge=0, le=1)
    scale: tuple[float, float] | None = (0.8, 1.25)
    scale_p: float = Field(default=0.3, ge=0, le=1)
    brightness: float = Field(default=0.1, ge=0, description="per-band shift, in standard deviations")
    contrast: float = Field(default=0.1, ge=0, lt=1, description="per-band gain in 1 +- contrast")
    noise: float = Field(default=0.02, ge=0, description="gaussian noise std, in standard deviations")
    rotate: float = Field(default=0.0, ge=0, le=180, description="rotation by any angle up to +- this many degrees")
    shift: float = Field(default=0.0, ge=0, le=0.5, description="shift by up to +- this share of the chip")
    shear: float = Field(default=0.0, ge=0, le=45, description="shear by up to +- this many degrees")
    affine_p: float = Field(default=0.5, ge=0, le=1, description="probability of the rotation, shift and shear")


class EarlyStoppingConfig(_Strict):
    patience: int | None = Field(default=None, ge=1, description="epochs without improvement before stopping")
    min_delta: float = Field(default=0.0, ge=0)


UNBOUNDED_EPOCHS = 1_000_000
FINE_TUNE_PASSES = 200.0
"""Passes over the labelled training pixels after which a run from pretrained weights ends unless told
otherwise (``passes``): measured on SpaceNet buildings over three seeds, benchmarks/RESULTS.md."""


class TrainConfig(_Strict):
    """A whole training run. Build it in Python or read it with :func:`load_config`."""

    name: str = "model"
    classes: list[ClassConfig] = Field(min_length=2)
    background_class: int | None = Field(
        default=None, description="class id of pixels outside every polygon (vector labels); null = unlabelled")
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: list[LossTerm] = Field(default_factory=lambda: [LossTerm(name="cross_entropy"), LossTerm(name="dice")])
    class_weights: Literal["none", "auto"] | list[float] = Field(
        default="auto", description="cross-entropy class weights: none, auto (inverse sqrt frequency) or a list")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    epochs: int | None = Field(default=None, ge=1, description="passes over the training chips; default 20, or "
                                                               "as many as max_seconds allows when it is set")
    steps_per_epoch: int | None = Field(default=None, ge=1, description="batches per epoch; overrides samples_per_epoch")
    passes: float | None = Field(default=None, gt=0, description=(
        "most passes over the labelled training pixels (how often each is seen, on average): the schedule "
        f"completes at this, epochs or max_seconds, whichever comes first; unset: {FINE_TUNE_PASSES:g} when "
        "model.encoder_weights is set and epochs is not (fine-tuning a small set longer over-fits it), else no limit"))
    batch_size: int = Field(default=8, ge=1)
    max_seconds: float | None = Field(
        default=None, gt=0, description="time budget in seconds: the learning-rate schedule completes within it "
                                         "and the run ends when it is spent (or at epochs, whichever comes first)")
    val_batches: int | None = Field(default=None, ge=1, description="cap on validation batches per epoch")
    monitor: Literal["miou", "loss", "accuracy", "f1"] = "miou"
    keep: Literal["best", "last"] = Field(default="last", description=(
        "the weights the bundle keeps: 'last' (the end of the completed, annealed schedule; validation is "
        "still scored and reported) or 'best' (the epoch with the best validation monitor)"))
    seed: int = 0
    device: str = Field(default="auto", description="auto, cpu, cuda, cuda:N or mps")
    precision: Literal["32", "16-mixed", "bf16-mixed"] = "32"
    threads: int | None = Field(default=None, ge=1, description="CPU threads for torch")
    plots: bool = True
    tensorboard: bool = True
    preview_chips: int = Field(default=4, ge=0)

    @field_validator("loss", mode="before")
    @classmethod
    def _loss_shorthand(cls, v: Any) -> Any:
        # "dice" or ["ce", "dice"] or {"ce": 1, "dice": 0.5} are all accepted
        if isinstance(v, str):
            return [{"name": v}]
        if isinstance(v, dict):
            return [{"name": k, "weight": w} for k, w in v.items()]
        if isinstance(v, list):
            return [{"name": t} if isinstance(t, str) else t for t in v]
        return v

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        ids = [c.id for c in self.classes]
        if len(set(ids)) != len(ids):
            raise ValueError(f"class ids must be unique, got {ids}")
        if self.background_class is not None and self.background_class not in ids:
            raise ValueError(f"background_class {self.background_class} is not one of the class ids {ids}")
        if self.model.activation == "sigmoid" and len(self.classes) != 2:
            raise ValueError("model.activation sigmoid needs exactly two classes (negative, positive)")
        if isinstance(self.class_weights, list) and len(self.class_weights) != len(self.classes):
            raise ValueError(f"class_weights has {len(self.class_weights)} values for {len(self.classes)} classes")
        if not self.loss:
            raise ValueError(f"give at least one loss term; valid names: {', '.join(LOSS_NAMES)}")
        for s in self.data.scenes:
            if s.label_value is not None and s.label_value not in ids:
                raise ValueError(f"label_value {s.label_value} of {s.labels} is not one of the class ids {ids}")
        return self

    # ------------------------------------------------------------------ derived values

    @property
    def epoch_limit(self) -> int:
        """``epochs``; unset: 20, or unbounded (the time budget decides) when ``max_seconds`` is set."""
        if self.epochs is not None:
            return self.epochs
        return UNBOUNDED_EPOCHS if self.max_seconds else 20

    @property
    def pass_limit(self) -> float | None:
        """``passes``; unset: :data:`FINE_TUNE_PASSES` from pretrained weights without ``epochs``, else none."""
        if self.passes is not None:
            return self.passes
        return FINE_TUNE_PASSES if self.model.encoder_weights and self.epochs is None else None

    @property
    def overlap(self) -> int:
        return self.data.overlap if self.data.overlap is not None else self.data.chip_size // 4

    def class_colors(self) -> list[tuple[int, int, int]]:
        return [c.color or _DEFAULT_COLORS[i % len(_DEFAULT_COLORS)] for i, c in enumerate(self.classes)]

    def to_yaml_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class PretrainConfig(_Strict):
    """Self-supervised pretraining of an encoder on unlabelled scenes (:mod:`geoseg.learn.pretrain`)."""

    name: str = "encoder"
    scenes: list[str] = Field(min_length=1, description="unlabelled images (paths, globs or URLs)")
    bands: list[int] | None = Field(default=None, description="1-based scene band numbers; default all bands")
    model: ModelConfig = Field(default_factory=ModelConfig)
    chip_size: int = Field(default=128, ge=16)
    batch_size: int = Field(default=8, ge=1)
    mask_ratio: float = Field(default=0.6, gt=0, lt=1, description="share of the patches hidden from the network")
    mask_patch: int = Field(default=16, ge=1, description="side of a hidden patch in pixels; divides chip_size")
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.05, ge=0)
    max_seconds: float | None = Field(default=300.0, gt=0, description="time budget (the schedule completes in it)")
    steps: int | None = Field(default=None, ge=1, description="optimiser steps; unset: as many as max_seconds allows")
    min_valid_fraction: float = Field(default=0.5, ge=0, le=1)
    seed: int = 0
    device: str = "auto"
    threads: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> PretrainConfig:
        if self.chip_size % self.mask_patch:
            raise ValueError(f"mask_patch {self.mask_patch} must divide chip_size {self.chip_size}")
        if self.max_seconds is None and self.steps is None:
            raise ValueError("give max_seconds or steps (or both): pretraining has no other end")
        return self


def load_pretrain_config(path: str | os.PathLike[str]) -> PretrainConfig:
    """Read and validate a YAML pretraining config (scene paths relative to its folder).

    Raises:
        ConfigError: the file is missing, is not YAML, or does not validate.
    """
    p = Path(path)
    data = read_yaml_file(p, "no such config file; copy configs/pretrain.yaml and edit it")
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a pretraining config must be a mapping of keys, got {type(data).__name__}")
    try:
        cfg = PretrainConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(p), PretrainConfig)) from None
    cfg.scenes = [resolve_path(s, p.parent) for s in cfg.scenes]
    return cfg


def config_from_dict(data: Any, where: str = "config", base_dir: str | os.PathLike[str] | None = None) -> TrainConfig:
    """Validate a mapping as a :class:`TrainConfig`; relative scene paths are resolved against ``base_dir``.

    Raises:
        ConfigError: the mapping does not validate (the message names the key and the allowed values).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: a training config must be a mapping of keys, got {type(data).__name__}")
    try:
        cfg = TrainConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, where, TrainConfig)) from None
    if base_dir is not None:
        for s in cfg.data.scenes:
            for key in ("image", "labels"):
                setattr(s, key, resolve_path(getattr(s, key), base_dir))
    return cfg


def load_config(path: str | os.PathLike[str]) -> TrainConfig:
    """Read and validate a YAML training config.

    Raises:
        ConfigError: the file is missing, is not YAML, or does not validate.
    """
    p = Path(path)
    data = read_yaml_file(p, "no such config file; copy one of configs/*.yaml and edit it")
    return config_from_dict(data, str(p), base_dir=p.parent)


def dump_config(cfg: TrainConfig, path: str | os.PathLike[str]) -> None:
    """Write ``cfg`` as YAML (the exact config a run used)."""
    import yaml

    Path(path).write_text(yaml.safe_dump(cfg.to_yaml_dict(), sort_keys=False))


__all__ = [
    "TrainConfig", "DataConfig", "SceneConfig", "ClassConfig", "ModelConfig", "LossTerm", "OptimizerConfig",
    "AugmentConfig", "EarlyStoppingConfig", "PretrainConfig", "load_pretrain_config", "load_config", "config_from_dict", "dump_config", "LOSS_NAMES",
]
