"""What this machine can do: the CPU's features, the device, and the precision and batch size that suit them.

``--precision auto`` and ``--batch-size auto`` (and ``--backend auto``, by a probe in :mod:`geoseg.predict.runtime`)
are resolved once per job, on a machine that runs the model (this process for the local scheduler, one dask
worker for a cluster), and the concrete values go into every unit and into the scenes' fingerprints: the
batch shape, the number format and the runtime shape the bytes of the outputs, so a resumed or distributed
job must use the same ones everywhere.

Choices, and the measurements behind them (smp U-Net resnet18, 512 px chips, channels_last):

- CPU precision: bf16 autocast only where the CPU multiplies bf16 tiles natively (Intel AMX): there it
  measured ~3x faster per chip than fp32. On a CPU with AVX512-BF16 but no AMX it measured slower than fp32
  (0.28-0.30 s vs 0.20 s per chip on a 2-core Xeon whose hypervisor hides AMX), so ``auto`` stays fp32 there.
  Detected from the CPU's feature flags (torch's own checks), never from the model name, and capped where
  the environment caps oneDNN's instruction set (``ONEDNN_MAX_CPU_ISA``, read by PyTorch's and OpenVINO's CPU
  kernels alike: ``AVX512_CORE_BF16`` runs an AMX machine as one without AMX).
- CPU batch: about one 512 x 512 chip of pixels per batch (batch 1 at 512 px, 4 at 256, 16 at 128). A
  CPU runs a batch as one long convolution over every chip, so a larger batch does not run faster per
  chip (batch 8 at 512 px was 1.3x slower per chip than batch 1) and holds its activations in memory
  (about 130 MB per 512 px chip for U-Net resnet18).
- CUDA batch: the largest power of two up to 32 whose measured peak memory (two probe batches at this
  tile size) fits in 60 % of the device's free memory.
"""

from __future__ import annotations

import logging
import math
import platform
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from geoseg.errors import InputError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

AUTO = "auto"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # PyTorch networks
ALL_PRECISIONS = (*PRECISIONS, "int8")  # int8: ONNX bundles (geoseg.predict.onnx_predictor)
CPU_BATCH_PIXELS = 512 * 512  # pixels per CPU batch under --batch-size auto
MAX_BATCH = 32
GPU_MEMORY_SHARE = 0.6  # of the free device memory, for --batch-size auto on CUDA
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("eager", "onnxruntime")  # what runs a PyTorch network (geoseg.predict.backends)
ONNX_BACKENDS = ("onnxruntime", "openvino")  # what runs an ONNX bundle (geoseg.predict.onnx_predictor)
ALL_BACKENDS = ("eager", "onnxruntime", "openvino", "auto")  # auto: the fastest, by a probe (geoseg.predict.runtime)


@dataclass(frozen=True)
class CpuFeatures:
    """The CPU's name and the features that decide the number format on CPU."""

    name: str
    cores: int
    amx: bool  # Intel AMX tiles (bf16 matrix units)
    avx512_bf16: bool

    @property
    def native_bf16(self) -> bool:
        """bf16 that measured faster than fp32: AMX (AVX512-BF16 alone did not)."""
        return self.amx

    def describe(self) -> str:
        flags = [f for f, on in (("AMX", self.amx), ("AVX512-BF16", self.avx512_bf16)) if on]
        return f"{self.name}, {self.cores} cores, {' + '.join(flags) or 'no native bf16'}"


def cpu_features() -> CpuFeatures:
    """This machine's CPU, from ``/proc/cpuinfo`` (Linux) and torch's instruction-set checks.

    Without torch loaded (an ONNX job, which never imports it) the features are the kernel's CPU flags
    (``amx_tile``, ``avx512_bf16``) instead.
    """
    name = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name == (platform.processor() or platform.machine()):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
                if flags and not name.startswith(platform.machine()):
                    break
    except OSError:
        pass
    from geoseg.io.workers import cpu_cores

    torch = sys.modules.get("torch")
    if torch is None:
        amx, avx512_bf16 = "amx_tile" in flags, "avx512_bf16" in flags
    else:
        cpu = getattr(torch, "cpu", None)
        amx = bool(getattr(cpu, "_is_amx_tile_supported", lambda: False)())
        avx512_bf16 = bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)())
    cap = isa_cap()
    if cap is not None:
        amx = amx and "AMX" in cap
        avx512_bf16 = avx512_bf16 and any(k in cap for k in ("BF16", "FP16", "AMX", "AVX10"))
    return CpuFeatures(name, cpu_cores(), amx, avx512_bf16)


def isa_cap() -> str | None:
    """The instruction set oneDNN is capped at by the environment (``ONEDNN_MAX_CPU_ISA``, or the older
    ``DNNL_MAX_CPU_ISA``), upper case; ``None`` when uncapped (unset, ``ALL`` or ``DEFAULT``)."""
    import os

    value = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    return None if value in ("", "ALL", "DEFAULT") else value


def resolve_precision(precision: str, device: Any) -> str:
    """The concrete number format for ``precision`` on ``device``: ``fp32``, ``bf16`` or ``fp16``.

    ``auto``: bf16 on CUDA where supported (else fp16); on CPU bf16 with AMX, else fp32; fp32 elsewhere.

    Raises:
        InputError: an unknown precision, or fp16 asked of a CPU.
    """
    import torch

    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    kind = torch.device(device).type
    if precision == AUTO:
        if kind == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if kind == "cpu" and cpu_features().native_bf16:
            return "bf16"
        return "fp32"
    if precision == "fp16" and kind == "cpu":
        raise InputError("--precision fp16: CPUs have no fast fp16 convolutions; use --precision bf16 or fp32")
    return precision


def cpu_batch_size(tile: int) -> int:
    """``--batch-size auto`` on a CPU: about :data:`CPU_BATCH_PIXELS` pixels per batch, a power of two."""
    chips = max(1, CPU_BATCH_PIXELS // (tile * tile))
    return min(MAX_BATCH, 1 << int(math.log2(chips)))


def batch_for_memory(base_bytes: float, per_chip_bytes: float, free_bytes: float) -> int:
    """The largest power of two up to :data:`MAX_BATCH` with ``base + b * per_chip`` within the usable share of
    ``free_bytes`` (at least 1)."""
    budget = GPU_MEMORY_SHARE * free_bytes - base_bytes
    chips = int(budget // per_chip_bytes) if per_chip_bytes > 0 else MAX_BATCH
    if chips < 1:
        return 1
    return min(MAX_BATCH, 1 << int(math.log2(chips)))


def gpu_batch_size(predictor: Any, tile: int, bands: int) -> int:
    """``--batch-size auto`` on CUDA: measure the peak memory of batches of 1 and 2 chips, then
    :func:`batch_for_memory`."""
    import torch

    dev = predictor.device
    peaks = []
    for n in (1, 2):
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        start = torch.cuda.memory_allocated(dev)
        x = torch.zeros((n, bands, tile, tile), device=dev).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            predictor.forward(x)
        torch.cuda.synchronize(dev)
        peaks.append(torch.cuda.max_memory_allocated(dev) - start)
        del x
    torch.cuda.empty_cache()
    per_chip = max(peaks[1] - peaks[0], peaks[0] / 2, 1)
    free, _total = torch.cuda.mem_get_info(dev)
    return batch_for_memory(peaks[0] - per_chip, per_chip, free)


@dataclass(frozen=True)
class DeviceSettings:
    """What a job's units run with: the backend, precision and batch size made concrete, and where it was decided."""

    precision: str
    batch_size: int
    device: str  # the device the settings were resolved on, e.g. "cpu" or "cuda:0"
    machine: str  # a line describing that machine
    backend: str = "eager"  # what runs the network (geoseg.predict.backends, geoseg.predict.onnx_predictor)
    # --backend auto: (backend, its precision, median seconds per batch) of each candidate the probe timed,
    # fastest first; empty when nothing was probed
    probe: tuple[tuple[str, str, float], ...] = ()


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when available, else Apple's MPS when available, else the CPU.

    Raises:
        InputError: an unknown device, or one that is not available on this machine.
    """
    import torch

    name = device.lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {device!r}; valid: auto, cpu, cuda, cuda:N, mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA device is available here; use --device cpu or auto")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"unknown device {device!r}; valid: auto, cpu, cuda, cuda:N, mps")
    return dev
