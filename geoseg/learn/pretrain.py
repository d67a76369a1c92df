"""Self-supervised pretraining of an encoder on the user's own unlabelled scenes.

Teams have far more imagery than labels. ``geoseg pretrain`` learns from the imagery alone by masked-image
modelling (SimMIM's recipe, on a convolutional network): chips are drawn at random from the scenes,
``mask_ratio`` of their ``mask_patch`` px patches are hidden (set to the band mean), and the config's
network, with one output per band, learns to reconstruct the hidden pixels (L1 on the normalised bands,
over hidden valid pixels only). Flips and 90-degree rotations vary the chips; the learning rate runs a
one-cycle schedule within ``max_seconds`` (or ``steps``).

The result is a ``.safetensors`` file holding the network's ``encoder.*`` weights and, in its metadata, the
encoder, bands and normalisation it learned with; a training config names it as ``model.encoder_weights``
(:func:`geoseg.model.networks.load_encoder_weights`), with the same ``model.encoder``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from geoseg.errors import InputError, OutputExistsError
from geoseg.io.raster import SceneReader, inspect_scene
from geoseg.learn.config import PretrainConfig

log = logging.getLogger(__name__)

STATS_WINDOWS = 32  # random windows read per scene for the band statistics


@dataclass
class PretrainResult:
    """The encoder file and what the run did."""

    path: Path
    steps: int
    seconds: float
    chips: int
    loss_first: float  # mean reconstruction loss of the first and the last tenth of the steps
    loss_last: float


PretrainProgress = Callable[[int, int, float], None]  # (step, total or 0 when the budget decides, loss)


class _Chips:
    """Random chips of the scenes (area-weighted), normalised, with their validity."""

    def __init__(self, cfg: PretrainConfig):
        from geoseg.predict.api import expand_scenes

        self.cfg = cfg
        self.paths = expand_scenes(cfg.scenes)
        self.infos = [inspect_scene(p) for p in self.paths]
        first = self.infos[0]
        self.bands = list(cfg.bands) if cfg.bands else list(range(1, first.count + 1))
        for info in self.infos:
            bad = [b for b in self.bands if not 1 <= b <= info.count]
            if bad:
                raise InputError(f"{info.path}: has {info.count} band(s); bands asks for {bad}")
            if min(info.width, info.height) < cfg.chip_size:
                raise InputError(f"{info.path}: is {info.width}x{info.height}, smaller than chip_size "
                                 f"{cfg.chip_size}; lower chip_size or leave the scene out")
        self.rng = np.random.default_rng(cfg.seed)
        areas = np.array([i.width * i.height for i in self.infos], dtype=np.float64)
        self.weights = areas / areas.sum()
        self.mean, self.std = self._stats()
        self.readers = [SceneReader(p, self.bands, self.mean, self.std) for p in self.paths]

    def _window(self, k: int) -> Any:
        from rasterio.windows import Window

        info, c = self.infos[k], self.cfg.chip_size
        r0 = int(self.rng.integers(0, info.height - c + 1))
        c0 = int(self.rng.integers(0, info.width - c + 1))
        return Window(c0, r0, c, c)

    def _stats(self) -> tuple[list[float], list[float]]:
        from geoseg.learn.data import BandStats

        stats = BandStats.empty(len(self.bands))
        zero, one = [0.0] * len(self.bands), [1.0] * len(self.bands)
        for k, path in enumerate(self.paths):
            reader = SceneReader(path, self.bands, zero, one)  # raw units
            try:
                for _ in range(STATS_WINDOWS):
                    data, valid = reader.read(self._window(k))
                    stats.update(data, np.broadcast_to(valid, data.shape))
            finally:
                reader.close()
        if not stats.count.all():
            raise InputError(f"{self.paths[0]}: no valid pixel found in {STATS_WINDOWS} random chips per scene; "
                             "check the scenes' nodata and bands")
        return stats.mean.tolist(), stats.std.tolist()

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` chips ``(n, C, H, W)`` with validity ``(n, 1, H, W)``; chips mostly nodata are drawn again."""
        xs: list[np.ndarray] = []
        vs: list[np.ndarray] = []
        tries = 0
        while len(xs) < n:
            k = int(self.rng.choice(len(self.paths), p=self.weights))
            data, valid = self.readers[k].read(self._window(k))
            tries += 1
            if valid.mean() < self.cfg.min_valid_fraction and tries < 50 * n:
                continue
            turn, flip = int(self.rng.integers(0, 4)), bool(self.rng.integers(0, 2))
            data, valid = np.rot90(data, turn, (1, 2)), np.rot90(valid, turn)
            if flip:
                data, valid = data[:, :, ::-1], valid[:, ::-1]
            xs.append(np.ascontiguousarray(data))
            vs.append(np.ascontiguousarray(valid)[None])
        return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(vs))

    def close(self) -> None:
        for r in self.readers:
            r.close()


def _mask(n: int, size: int, patch: int, ratio: float, g: torch.Generator) -> torch.Tensor:
    """``(n, 1, size, size)`` float: 1 where a hidden patch is."""
    cells = size // patch
    hidden = (torch.rand(n, 1, cells, cells, generator=g) < ratio).float()
    return hidden.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)


def pretrain(config: PretrainConfig, output: str | os.PathLike[str], *, overwrite: bool = False,
             progress: PretrainProgress | None = None) -> PretrainResult:
    """Pretrain the encoder of ``config.model`` on ``config.scenes`` and write it to ``output`` (.safetensors).

    Raises:
        ConfigError: an encoder or architecture that cannot be built.
        InputError: scenes that cannot be read or hold no valid pixels.
        OutputExistsError: ``output`` exists and ``overwrite`` is false.
    """
    from geoseg.io.store import staged_file
    from geoseg.learn.network import arch_spec
    from geoseg.learn.optim import Schedule
    from geoseg.model.networks import create_network, drop_modules, input_divisor, unused_modules
    from geoseg.predict.hardware import resolve_device

    out = Path(output)
    if out.suffix != ".safetensors":
        raise InputError(f"{out}: the encoder file must end in .safetensors")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out}: already exists; pass --overwrite or choose another file")
    cfg = config
    spec = arch_spec(cfg)
    if spec.architecture.lower() == "conv1x1":
        raise InputError("model.architecture conv1x1 has no encoder to pretrain; choose an smp architecture")
    div = input_divisor(spec)
    if cfg.chip_size % div:
        raise InputError(f"chip_size {cfg.chip_size} must be a multiple of {div} for this encoder depth")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    chips = _Chips(cfg)
    try:
        bands = len(chips.bands)
        net = create_network(spec, bands, bands, cfg.model.encoder_weights)
        drop_modules(net, unused_modules(net, bands, cfg.chip_size))  # stages past encoder_depth: not learned
        net = net.to(device).train()
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        limit = cfg.steps or 10**9
        schedule = Schedule("onecycle", cfg.lr, opt, limit, cfg.max_seconds)
        g = torch.Generator().manual_seed(cfg.seed)
        losses: list[float] = []
        start = time.perf_counter()
        while not schedule.done and schedule.steps < limit:
            x, valid = chips.batch(cfg.batch_size)
            hidden = _mask(x.shape[0], cfg.chip_size, cfg.mask_patch, cfg.mask_ratio, g)
            x, valid, hidden = x.to(device), valid.to(device), hidden.to(device)
            weight = hidden * valid
            pred = net(x * (1 - hidden))
            pred = pred[0] if isinstance(pred, (tuple, list)) else pred
            loss = ((pred - x).abs() * weight).sum() / (weight.sum() * bands).clamp(min=1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            schedule.step(time.perf_counter() - start)
            losses.append(float(loss.detach()))
            if progress:
                progress(schedule.steps, cfg.steps or 0, losses[-1])
        seconds = time.perf_counter() - start
    finally:
        chips.close()
    tenth = max(1, len(losses) // 10)
    first, last = float(np.mean(losses[:tenth])), float(np.mean(losses[-tenth:]))
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in net.state_dict().items()
             if k.startswith("encoder.")}
    meta = {"geoseg_pretrain": json.dumps({
        "name": cfg.name, "architecture": spec.architecture, "encoder": spec.encoder, "params": spec.params,
        "bands": chips.bands, "mean": chips.mean, "std": chips.std, "chip_size": cfg.chip_size,
        "mask_ratio": cfg.mask_ratio, "mask_patch": cfg.mask_patch, "steps": len(losses),
        "seconds": round(seconds, 1), "loss_first": first, "loss_last": last,
        "scenes": [os.path.basename(p) for p in chips.paths],
    })}
    from safetensors.torch import save_file

    with staged_file(out) as tmp:
        save_file(state, str(tmp), metadata=meta)
    log.info("pretrained %s for %d steps in %.0f s: reconstruction loss %.4f -> %.4f; %s", spec.encoder,
             len(losses), seconds, first, last, out)
    if not math.isfinite(last):
        log.warning("the reconstruction loss is not finite; lower lr")
    return PretrainResult(out, len(losses), seconds, len(losses) * cfg.batch_size, first, last)


__all__ = ["pretrain", "PretrainResult"]
