"""What a training config leaves unset, sized to the scenes: chip size, split blocks, kept epoch, network."""

from __future__ import annotations

import logging
import math
from typing import Any

from geoseg.errors import ConfigError
from geoseg.learn.config import ModelConfig, TrainConfig
from geoseg.learn.network import arch_spec
from geoseg.model.networks import input_divisor, is_local_file
from geoseg.model.pretrained import read_encoder_file

log = logging.getLogger(__name__)


def fit_to_data(cfg: TrainConfig) -> TrainConfig:
    """The config with what the user left unset sized to the scenes (read from their headers only).

    - ``data.chip_size`` (unset): 256 px where every scene is at least 512 px on its shorter side, else the
      largest power of two within half of the smallest scene's shorter side (at least what the network
      needs): small scenes train instead of failing with "no training chip".
    - ``data.split_block`` (unset): one chip, so the validation blocks are a sample of the scene, not one
      half of a small one.
    - ``keep`` (unset): ``best`` when early stopping is on (the run stops past its best epoch), else ``last``.
    - ``model.encoder`` and ``model.architecture`` (unset) with a local ``model.encoder_weights`` file: those
      its metadata names (:func:`_from_weights_file`).
    - ``model.encoder`` (unset): resnet18; ``model.params`` (unset, on a U-Net): the depth and decoder of
      :func:`default_network` for the chip. Key by key, so a config that sets only ``model.dropout`` keeps
      the sized network rather than falling back to smp's resnet34 at depth 5.
    The result is what ``config.yaml`` records, so a resumed run fits the same way.
    """
    from geoseg.io.raster import inspect_scene

    cfg = _from_weights_file(cfg)
    d = cfg.data
    update: dict[str, Any] = {}
    m = cfg.model
    sized_params = "params" not in m.model_fields_set and m.architecture.lower() == "unet"  # sized below
    if "chip_size" not in d.model_fields_set:
        side = min(min(i.width, i.height) for i in (inspect_scene(s.image) for s in d.scenes))
        floor = 32 if sized_params else max(input_divisor(arch_spec(cfg)), 16)
        chip = 256
        while chip > floor and chip > side / 2:
            chip //= 2
        update["chip_size"] = max(chip, floor)
        if update["chip_size"] != d.chip_size:
            log.info("data.chip_size %d (scenes of %d px on their shorter side)", update["chip_size"], side)
    chip = update.get("chip_size", d.chip_size)
    if d.split_block is None:
        update["split_block"] = chip
    if d.overlap is None and "chip_size" in update:
        update["overlap"] = chip // 4
    fitted = cfg.model_copy(update={"data": d.model_copy(update=update)}) if update else cfg
    if cfg.early_stopping.patience and "keep" not in cfg.model_fields_set:
        fitted = fitted.model_copy(update={"keep": "best"})
    sized = default_network(chip)
    net: dict[str, Any] = {"encoder": sized.encoder} if "encoder" not in m.model_fields_set else {}
    if sized_params:
        net["params"] = sized.params
    if net:
        fitted = fitted.model_copy(update={"model": m.model_copy(update=net)})
    return fitted


def _from_weights_file(cfg: TrainConfig) -> TrainConfig:
    """The config with the encoder (and, for a whole network, the architecture) a weights file's metadata names,
    where the user left them unset: naming the file is enough.

    Raises:
        ConfigError: the user's ``model.encoder`` is not the one the file was made for.
    """
    m = cfg.model
    path = m.encoder_weights
    if not path or not is_local_file(path):
        return cfg
    said = read_encoder_file(path, tensors=False)
    update: dict[str, Any] = {}
    if said.encoder:
        if "encoder" in m.model_fields_set and m.encoder != said.encoder:
            raise ConfigError(f"model.encoder {m.encoder!r} disagrees with model.encoder_weights {path!r}, made for "
                              f"{said.encoder!r}; drop model.encoder or set it to {said.encoder!r}")
        update["encoder"] = said.encoder
    if said.architecture and "architecture" not in m.model_fields_set:
        update["architecture"] = said.architecture
    if not update:
        return cfg
    log.info("model %s from %s", ", ".join(f"{k} {v}" for k, v in update.items()), path)
    fields = m.model_fields_set | set(update)  # set, so that sizing below keeps them
    new = m.model_copy(update=update)
    new.__pydantic_fields_set__ = set(fields)
    return cfg.model_copy(update={"model": new})


def default_network(chip: int) -> ModelConfig:
    """The network a config that names none gets: a U-Net on resnet18, as deep as the chip allows.

    Measured on the small labelled sets of ``benchmarks/bench_training.py`` (RESULTS.md): at the same time
    budget a resnet18 U-Net at depth 4 with a light decoder sees twice the chips of smp's default (resnet34,
    depth 5) and scores higher; one stage shallower scored lower (buildings, 128 px chips, depth 3: 0.205 and
    0.186 building IoU at two seeds against 0.272 and 0.247). Depth: 3 for 32-64 px chips, 4 for 128 px,
    5 from 256 px.
    """
    depth = max(3, min(5, int(math.log2(chip)) - 3))
    decoder = [256, 128, 64, 32, 16][5 - depth:] if depth == 5 else [128, 64, 32, 16][4 - depth:]
    return ModelConfig(architecture="unet", encoder="resnet18",
                       params={"encoder_depth": depth, "decoder_channels": decoder})
