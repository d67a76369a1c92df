"""CPU forward of an smp network per inference backend, against eager PyTorch (channels_last, fp32).

Backends measured (fp32; ``-bf16``: under CPU autocast to bfloat16):
  eager             eager PyTorch, channels_last: the yardstick (geoseg.predict.backends "eager")
  jit               torch.jit.trace + torch.jit.freeze
  jit-onednn        the same with oneDNN Graph fusion (torch.jit.enable_onednn_fusion(True))
  compile           torch.compile, inductor, static shapes, weights frozen (inductor's ``freezing``);
                    ``compile-unfrozen`` without freezing. Each compiles with a fresh cache: cold times
  onnxruntime       geoseg.predict.backends "onnxruntime": geoseg's ONNX export + ONNX Runtime's CPU provider,
                    graph optimisation ALL, intra-op threads = torch threads, no spinning;
                    ``onnxruntime-spin``: ONNX Runtime's default spinning thread pool. Not in bf16:
                    the export is float32, and bf16 was slower than fp32 everywhere here (no AMX)

The input is real: chips of the 1024^2 aerial photo in ``$GEOSEG_REAL_DATA/aerial_cog`` (falls back to a
synthetic scene from ``geoseg.learn.synthetic``), each band normalised to mean 0, std 1. The network has random
seeded weights (``encoder_weights=None``): its logits are less decided than a trained network's, so the
arg max agreement with eager fp32 is a pessimistic figure. All backends run interleaved (A B C A B C ...)
in one process; each timing is ``--calls`` forwards, repeated ``--repeats`` times; the table gives the median s/chip and the best
(least disturbed by other processes), each with its ratio to eager, and "ready": the seconds from the
network to the first logits (export, trace or compile, and the first run).

    python benchmarks/bench_backends.py                       # U-Net resnet18, 512 px, batch 1 and 2
    python benchmarks/bench_backends.py --arch deeplabv3plus --batch 1
    python benchmarks/bench_backends.py --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch._inductor.utils import fresh_inductor_cache

from geoseg.predict.backends import agreement

Forward = Callable[[torch.Tensor], torch.Tensor]
REAL = Path(os.environ.get("GEOSEG_REAL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def _first(logits: Any) -> torch.Tensor:
    return logits[0] if isinstance(logits, (tuple, list)) else logits


def realistic_batch(batch: int, tile: int, bands: int = 3) -> tuple[torch.Tensor, str]:
    """``batch`` chips ``(N, C, tile, tile)`` of a real aerial photo (else a synthetic scene), normalised."""
    import rasterio
    from rasterio.windows import Window

    path = REAL / "aerial_cog" / "cogeo.tif"
    source = str(path)
    if not path.is_file():
        from geoseg.learn.synthetic import make_scene

        tmp = Path(tempfile.mkdtemp())
        side = tile * max(2, int(np.ceil(np.sqrt(batch))))
        path = make_scene(tmp / "scene.tif", tmp / "labels.tif", side, seed=0).image
        source = f"synthetic scene {side}^2 (geoseg.learn.synthetic, seed 0)"
    with rasterio.open(path) as src:
        cols, rows = max(1, src.width // tile), max(1, src.height // tile)
        chips = []
        for i in range(batch):  # the scene's chips in reading order, again from the start if it runs out
            r, c = divmod(i % (cols * rows), cols)
            win = Window(c * tile, r * tile, tile, tile)
            chips.append(src.read(indexes=list(range(1, bands + 1)), window=win, boundless=True).astype(np.float32))
    x = np.stack(chips)
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    std = x.std(axis=(0, 2, 3), keepdims=True) + 1e-6
    return torch.from_numpy((x - mean) / std), source


# ------------------------------------------- backends: (net, example) -> forward, ready after one call
# geoseg's own backends run through geoseg.predict.backends.prepare (which converts, runs the example once and
# checks agreement); the variants it does not ship are built here.

def _geoseg(backend: str, bf16: bool = False) -> Callable[[torch.nn.Module, torch.Tensor], Forward]:
    from geoseg.predict.backends import prepare

    def build(net: torch.nn.Module, example: torch.Tensor) -> Forward:
        return prepare(net, backend, torch.device("cpu"), example, torch.bfloat16 if bf16 else None)

    return build


def _jit(net: torch.nn.Module, example: torch.Tensor, bf16: bool = False, onednn: bool = False) -> Forward:
    was = torch.jit.onednn_fusion_enabled()
    torch.jit.enable_onednn_fusion(onednn)
    try:
        with torch.no_grad(), warnings.catch_warnings(), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(net, example, check_trace=False, strict=False)
            frozen = torch.jit.freeze(traced.eval())
    finally:
        torch.jit.enable_onednn_fusion(was)

    def forward(x: torch.Tensor) -> torch.Tensor:
        # the fusion flag is global and read when the profiling executor optimises the graph: set it per call
        prev = torch.jit.onednn_fusion_enabled()
        torch.jit.enable_onednn_fusion(onednn)
        try:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
                return _first(frozen(x)).float()
        finally:
            torch.jit.enable_onednn_fusion(prev)

    forward(example)
    return forward


def _compile(net: torch.nn.Module, example: torch.Tensor, bf16: bool = False, freezing: bool = True) -> Forward:
    """torch.compile, inductor, static shapes; ``freezing`` folds the weights into the graph (prepacked)."""
    compiled = torch.compile(net, backend="inductor", dynamic=False, options={"freezing": freezing})

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return _first(compiled(x)).float()

    forward(example)
    return forward


def _onnxruntime_spinning(net: torch.nn.Module, example: torch.Tensor) -> Forward:
    """geoseg's onnxruntime backend but with ONNX Runtime's default: intra-op threads spin between runs."""
    import onnxruntime as ort

    from geoseg.model.export import _export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        _export_onnx(net, example.contiguous(), Path(tmp) / "m.onnx", 17)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = torch.get_num_threads()
        sess = ort.InferenceSession(str(Path(tmp) / "m.onnx"), opts, providers=["CPUExecutionProvider"])

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(sess.run(["logits"], {"image": x.contiguous().numpy()})[0])

    forward(example)
    return forward


VARIANTS: dict[str, Callable[[torch.nn.Module, torch.Tensor], Forward]] = {
    "eager": _geoseg("eager"),
    "eager-bf16": _geoseg("eager", bf16=True),
    "jit": _jit,
    "jit-bf16": lambda n, e: _jit(n, e, bf16=True),
    "jit-onednn": lambda n, e: _jit(n, e, onednn=True),
    "jit-onednn-bf16": lambda n, e: _jit(n, e, bf16=True, onednn=True),
    "compile": _compile,
    "compile-bf16": lambda n, e: _compile(n, e, bf16=True),
    "compile-unfrozen": lambda n, e: _compile(n, e, freezing=False),
    "onnxruntime": _geoseg("onnxruntime"),
    "onnxruntime-spin": _onnxruntime_spinning,
}


def build_net(arch: str, encoder: str, classes: int, seed: int) -> torch.nn.Module:
    import segmentation_models_pytorch as smp

    torch.manual_seed(seed)
    net = smp.create_model(arch, encoder_name=encoder, encoder_weights=None, in_channels=3, classes=classes)
    return net.eval().to(memory_format=torch.channels_last)


def measure(args: argparse.Namespace, batch: int) -> list[dict[str, Any]]:
    net = build_net(args.arch, args.encoder, args.classes, args.seed)
    x, source = realistic_batch(batch, args.tile)
    x = x.contiguous(memory_format=torch.channels_last)
    names = [n for n in args.backends if n in VARIANTS]
    rows: dict[str, dict[str, Any]] = {}
    forwards: dict[str, Forward] = {}
    reference: torch.Tensor | None = None
    for name in names:
        row: dict[str, Any] = {"backend": name, "batch": batch, "input": source}
        rows[name] = row
        t0 = time.perf_counter()
        try:
            # a fresh inductor cache for each compile, so its time is a cold compile's
            with fresh_inductor_cache() if "compile" in name else contextlib.nullcontext():
                fwd = VARIANTS[name](net, x)
            row["ready_s"] = time.perf_counter() - t0
            for _ in range(args.warmup + 1):
                logits = fwd(x)
        except Exception as exc:  # noqa: BLE001 - a benchmark reports every failure and goes on
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
            print(f"  {name}: failed: {row['error']}", file=sys.stderr, flush=True)
            continue
        if reference is None:
            reference = logits
        row["agreement"] = agreement(logits, reference)
        row["max_abs_diff"] = float((logits.float() - reference).abs().max())
        forwards[name] = fwd
        print(f"  {name}: ready in {row['ready_s']:.1f} s", file=sys.stderr, flush=True)
    times: dict[str, list[float]] = {n: [] for n in forwards}
    for rep in range(args.repeats):
        for name, fwd in forwards.items():
            t0 = time.perf_counter()
            for _ in range(args.calls):
                fwd(x)
            times[name].append((time.perf_counter() - t0) / (args.calls * batch))
        print(f"  repeat {rep + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    base = statistics.median(times["eager"]) if times.get("eager") else None
    best_base = min(times["eager"]) if times.get("eager") else None
    for name, ts in times.items():
        rows[name]["s_per_chip"] = statistics.median(ts)
        rows[name]["best_s_per_chip"] = min(ts)
        rows[name]["all_s_per_chip"] = ts
        rows[name]["ratio_to_eager"] = statistics.median(ts) / base if base else None
        rows[name]["best_ratio_to_eager"] = min(ts) / best_base if best_base else None
    return list(rows.values())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="unet")
    p.add_argument("--encoder", default="resnet18")
    p.add_argument("--classes", type=int, default=6)
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 2])
    p.add_argument("--backends", nargs="+", default=list(VARIANTS), help=f"any of {', '.join(VARIANTS)}")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--calls", type=int, default=2, help="forwards per timing")
    p.add_argument("--warmup", type=int, default=2, help="calls after the first (made when ready), before timing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch (and ONNX Runtime intra-op) threads; default torch's")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if "eager" not in args.backends:
        args.backends.insert(0, "eager")
    unknown = set(args.backends) - set(VARIANTS)
    if unknown:
        p.error(f"unknown backends {sorted(unknown)}; valid: {', '.join(VARIANTS)}")
    args.backends.sort(key=lambda n: n != "eager")
    rows: list[dict[str, Any]] = []
    for batch in args.batch:
        print(f"{args.arch} {args.encoder}, {args.tile} px, batch {batch}", file=sys.stderr, flush=True)
        rows += measure(args, batch)
    print(f"\n{args.arch} {args.encoder}, {args.classes} classes, {args.tile}^2 chips, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; input: {rows[0]['input']}")
    print(f"{'backend':<22}{'batch':>6}{'s/chip':>9}{'x eager':>9}{'best s':>8}{'x eager':>9}{'ready s':>9}"
          f"{'agree %':>9}{'max |d|':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['backend']:<22}{r['batch']:>6}  failed: {r['error']}")
            continue
        ratio = f"{r['ratio_to_eager']:.2f}" if r.get("ratio_to_eager") else "-"
        best = f"{r['best_ratio_to_eager']:.2f}" if r.get("best_ratio_to_eager") else "-"
        print(f"{r['backend']:<22}{r['batch']:>6}{r['s_per_chip']:>9.3f}{ratio:>9}{r['best_s_per_chip']:>8.3f}{best:>9}"
              f"{r['ready_s']:>9.1f}{100 * r['agreement']:>9.2f}{r['max_abs_diff']:>9.2g}")
    if args.json:
        meta = {"arch": args.arch, "encoder": args.encoder, "classes": args.classes, "tile": args.tile,
                "torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": args.repeats,
                "calls": args.calls}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
