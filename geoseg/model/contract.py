"""The model contract: what a trained model takes and gives, as plain data.

Architecture, input bands and their order, normalisation, classes with names and colours, chip size and overlap,
pixel size. A contract is validated pydantic data: it imports neither torch nor the network code, so preflight
checks, job files and the CLI can read it cheaply, and everything that runs a model reads it rather than asking
the user to repeat it.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["CONTRACT_FILE", "FORMAT_VERSION", "METADATA_KEY", "WEIGHTS_FILE", "ArchSpec", "ClassInfo", "Contract",
           "InputSpec", "PretrainedSource", "check_rgb", "input_divisor"]

CONTRACT_FILE = "model.json"
WEIGHTS_FILE = "weights.safetensors"
METADATA_KEY = "geoseg_contract"
FORMAT_VERSION = 1


class ClassInfo(BaseModel):
    """One output class: the id written to the class map, a name and an RGB colour."""

    model_config = ConfigDict(extra="forbid")
    id: int = Field(ge=0, le=65534)
    name: str
    color: tuple[int, int, int] = (128, 128, 128)

    @field_validator("color")
    @classmethod
    def _rgb(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        return check_rgb(v)


def check_rgb(v: tuple[int, int, int]) -> tuple[int, int, int]:
    """The one colour rule of classes, in bundles and training configs alike."""
    if any(not 0 <= c <= 255 for c in v):
        raise ValueError(f"colour components must be 0..255, got {v}")
    return v


class InputSpec(BaseModel):
    """What the network takes: bands in order, their default scene indexes and normalisation.

    ``mean`` and ``std`` are in the scene's raw units (digital numbers, reflectance...), so that
    ``(raw - mean) / std`` is the network input whatever the dtype.
    """

    model_config = ConfigDict(extra="forbid")
    bands: list[str] = Field(min_length=1)
    band_indexes: list[int] | None = None
    mean: list[float]
    std: list[float]
    dtype: str | None = None
    pixel_size: float | None = Field(default=None, gt=0, description="metres per pixel at training")
    scene_bands: int | None = Field(default=None, ge=1, description="bands of the training scenes")

    @model_validator(mode="after")
    def _lengths(self) -> InputSpec:
        n = len(self.bands)
        for key in ("mean", "std"):
            if len(getattr(self, key)) != n:
                raise ValueError(f"input.{key} has {len(getattr(self, key))} values for {n} bands")
        if self.band_indexes is not None and len(self.band_indexes) != n:
            raise ValueError(f"input.band_indexes has {len(self.band_indexes)} values for {n} bands")
        if self.band_indexes is not None and min(self.band_indexes) < 1:
            raise ValueError("input.band_indexes are 1-based scene band numbers")
        if any(not (s > 0 and math.isfinite(s)) for s in self.std):
            raise ValueError("input.std values must be positive")
        return self

    @property
    def default_indexes(self) -> list[int]:
        return list(self.band_indexes) if self.band_indexes else list(range(1, len(self.bands) + 1))


class ArchSpec(BaseModel):
    """The network: an architecture from the registry in :mod:`geoseg.model.networks` and its arguments."""

    model_config = ConfigDict(extra="forbid")
    architecture: str = "unet"
    encoder: str | None = "resnet34"
    params: dict[str, Any] = Field(default_factory=dict)
    activation: Literal["softmax", "sigmoid"] = "softmax"
    unused: list[str] = Field(
        default_factory=list,
        description="modules of the built network its forward never calls (encoder stages past encoder_depth); "
                    "dropped, so the weights hold only what the network uses")


class PretrainedSource(BaseModel):
    """Where a trained network's encoder started: the weights file (its name and SHA-256 digest, or
    ``imagenet`` for smp's download), what it was pretrained on, its bands and, per input band of the model,
    the file band whose filter it took (``None``: initialised as smp initialises extra bands)."""

    model_config = ConfigDict(extra="forbid")
    file: str
    sha256: str | None = None
    encoder: str | None = None
    pretrained_on: str | None = None
    bands: list[str] | None = None
    matched: list[str | None] | None = None


class Contract(BaseModel):
    """Everything ``predict`` needs to use a model as it is."""

    model_config = ConfigDict(extra="forbid")
    format_version: int = FORMAT_VERSION
    name: str = "model"
    model: ArchSpec
    input: InputSpec
    classes: list[ClassInfo] = Field(min_length=1)
    chip_size: int = Field(default=512, ge=16)
    overlap: int = Field(default=128, ge=0)
    background_class: int | None = None
    weights: str = WEIGHTS_FILE
    pretrained: PretrainedSource | None = Field(
        default=None, description="where the encoder's weights came from before training (null: random)")
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("weights")
    @classmethod
    def _inside(cls, v: str) -> str:
        # a file name inside the bundle's folder: a bundle never reads (or, when saved, writes) elsewhere
        if not v or "/" in v or "\\" in v or v in (".", "..") or ":" in v:
            raise ValueError(f"weights must be a file name inside the bundle folder, got {v!r}")
        return v

    @model_validator(mode="after")
    def _check(self) -> Contract:
        ids = [c.id for c in self.classes]
        if len(set(ids)) != len(ids):
            raise ValueError(f"class ids must be unique, got {ids}")
        if self.overlap * 2 > self.chip_size:
            raise ValueError(f"overlap {self.overlap} must be at most half of chip_size {self.chip_size}")
        if self.model.activation == "sigmoid" and len(self.classes) != 2:
            raise ValueError("a sigmoid (single-logit) model needs exactly two classes")
        if self.background_class is not None and self.background_class not in ids:
            raise ValueError(f"background_class {self.background_class} is not a class id {ids}")
        return self

    @property
    def out_channels(self) -> int:
        return 1 if self.model.activation == "sigmoid" else len(self.classes)

    @property
    def in_channels(self) -> int:
        return len(self.input.bands)

    @property
    def class_ids(self) -> list[int]:
        return [c.id for c in self.classes]


def input_divisor(spec: ArchSpec) -> int:
    """The number a chip's height and width must be a multiple of for this network."""
    if spec.architecture.lower() == "conv1x1":
        return 1
    depth = int(spec.params.get("encoder_depth", 5))
    return 2**depth
