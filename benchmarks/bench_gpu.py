"""The CUDA path measured on a GPU (issue 25): correctness against the CPU, speed, what the GPU waits on.

Run by ``benchmarks/gpu_check.sh`` on a machine with an NVIDIA GPU (each step its own command, so that one
stuck step cannot take the others with it); every step adds its figures to ``OUT/results.json``:

- ``env``: GPU, driver, versions, CPU, ONNX Runtime's providers.
- ``agree``: class maps of trained bundles (the demo's, the SpaceNet buildings U-Net) on CUDA fp32 (with
  cuDNN's global TF32 flag as it comes; geoseg turns it off around an fp32 forward), fp32 with the flag off,
  and bf16, against the CPU's fp32 at the same batch size: share of identical pixels and, where they differ,
  the CPU's top-two probability margin there (a flip at a near tie).
- ``make``: the scenes: a 16384 x 16384 3-band uint8 COG (deflate, 512 px tiles, overviews) and a smaller one
  for the CPU, 64 px parcels plus noise; a U-Net resnet34 bundle with random weights (6 classes, 512 px
  chips, 128 px overlap, as ``bench_pipeline.py`` but resnet34).
- ``bare``: the network alone on the GPU (chips already on the device, CUDA events): chips/s and Mpix/s by
  batch size, bf16 and fp32, and what ``--batch-size auto`` picks.
- ``speed``: whole predict runs on the big scene (class map COG written, no polygons), each instrumented:
  wall time, Mpix/s, the run report's stage seconds, GPU busy (CUDA events around each batch's network, and
  ``nvidia-smi`` sampled every 200 ms), peak GPU memory (allocator and ``nvidia-smi``), peak host memory
  (RSS sampled every 50 ms), and the model thread's own time: waiting for chips (the GPU starved), preparing
  batches on the host, waiting for the GPU, copying results out; a ``profiled`` run also samples every
  thread's stack every 20 ms (where each group of threads spends its time). Variants patch the engine for an
  A/B in the same process: ``before`` (a host sync per batch for the overflow check, as before issue 25),
  ``slots8`` (8 batches of chips in flight instead of 3). Runs go in priority order (``--only`` picks and
  orders them) until ``--budget`` seconds are spent.
- ``cpu``: the CPU path, one job of 8 scenes (links to the smaller scene, one unit each), ``--scheduler
  local:N`` for N = 1, 2, 4, 8, then the threads scheduler; ``--warm`` starts each cluster once and times a
  cold then a warm job on it.

    OUT=/tmp/gpu-out python benchmarks/bench_gpu.py env      # then agree, make, bare, speed, cpu
    BENCH_DEVICE=cpu python benchmarks/bench_gpu.py make --size 2048 --cpu-size 1024   # a CPU rehearsal
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]

N_CLASSES = 6
OUT = Path(os.environ.get("OUT") or "/tmp/gpu-out")
RESULTS = OUT / "results.json"
DEVICE = os.environ.get("BENCH_DEVICE", "cuda")  # "cpu" rehearses the steps on a machine without a GPU
SMI = Path(os.environ.get("GPU_SMI_DIR") or "/tmp/gpu-smi")  # nvidia-smi samples, one CSV per run


def save(key: str, value: Any) -> None:
    """Merge ``value`` under ``key`` into ``OUT/results.json`` (rewritten whole after every measurement)."""
    OUT.mkdir(parents=True, exist_ok=True)
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data[key] = value
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(RESULTS)


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------ env


def step_env(args: argparse.Namespace) -> None:
    import numpy
    import rasterio
    import torch

    import geoseg.predict.hardware as hw

    info: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__,
                            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                            "numpy": numpy.__version__, "rasterio": rasterio.__version__,
                            "gdal": rasterio.__gdal_version__, "cpu": hw.cpu_features().describe(),
                            "cpu_count": os.cpu_count(), "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}
    for mod in ("segmentation_models_pytorch", "timm", "onnxruntime", "pydantic", "dask", "distributed"):
        try:
            m = __import__(mod)
            info[mod] = getattr(m, "__version__", "?")
        except ImportError as exc:
            info[mod] = f"missing ({exc})"
    try:
        import onnxruntime as ort

        info["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        pass
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info()
        info.update(gpu=p.name, sm=f"{p.major}.{p.minor}", multiprocessors=p.multi_processor_count,
                    gpu_memory_gib=round(total / 2**30, 1), gpu_free_gib=round(free / 2**30, 1),
                    bf16=torch.cuda.is_bf16_supported())
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
    say(json.dumps(info, indent=1))
    save("env", info)


# ------------------------------------------------------------------------------------------ agreement


def _classes_probs(path_c: Any, path_p: Any) -> tuple[Any, Any]:
    import rasterio

    with rasterio.open(path_c) as a, rasterio.open(path_p) as b:
        return a.read(1), b.read()


def step_agree(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from geoseg.predict.api import predict_scene

    work = Path(args.work) / "agree"
    out: dict[str, Any] = {}
    cases = [("demo", args.demo_bundle, args.demo_scene), ("spacenet", args.spacenet_bundle, args.spacenet_scene)]
    for name, bundle, scene in cases:
        kw = dict(vector_format=None, quicklook=False, probabilities=True, probabilities_dtype="float32",
                  batch_size=args.agree_batch, overwrite=True)
        t0 = time.perf_counter()
        cpu = predict_scene(scene, bundle, work / name / "cpu", device="cpu", precision="fp32", **kw)
        runs = {"cpu fp32": (cpu, time.perf_counter() - t0)}
        for label, prec, tf32 in (("cuda fp32", "fp32", True), ("cuda fp32 no-tf32", "fp32", False),
                                  ("cuda bf16", "bf16", True)):
            if args.agree_variants and label not in args.agree_variants:
                continue
            old = torch.backends.cudnn.allow_tf32
            torch.backends.cudnn.allow_tf32 = tf32
            try:
                t0 = time.perf_counter()
                r = predict_scene(scene, bundle, work / name / label.replace(" ", "-"), device=DEVICE,
                                  precision=prec, **kw)
                runs[label] = (r, time.perf_counter() - t0)
            finally:
                torch.backends.cudnn.allow_tf32 = old
        c_ref, p_ref = _classes_probs(cpu.classes_path, cpu.probabilities_path)
        valid = np.isfinite(p_ref).all(axis=0)  # probabilities are NaN where the scene is nodata
        top2 = np.sort(np.where(valid, p_ref, 0), axis=0)[-2:]
        margin = np.where(valid, top2[1] - top2[0], np.inf)
        case: dict[str, Any] = {"scene": str(scene), "pixels": int(c_ref.size), "valid_pixels": int(valid.sum()),
                                "batch_size": args.agree_batch,
                                "seconds": {k: round(v[1], 2) for k, v in runs.items()}}
        for label, (r, _) in runs.items():
            if label == "cpu fp32":
                continue
            c, p = _classes_probs(r.classes_path, r.probabilities_path)
            diff = c != c_ref
            case[label] = {
                "identical_share": float(1 - diff.mean()), "pixels_differing": int(diff.sum()),
                "max_abs_prob_diff": float(np.abs(p - p_ref)[:, valid].max()),
                "mean_abs_prob_diff": float(np.abs(p - p_ref)[:, valid].mean()),
                "cpu_margin_where_differing_max": float(margin[diff].max()) if diff.any() else None,
                "cpu_margin_where_differing_median": float(np.median(margin[diff])) if diff.any() else None,
                "pixels_with_cpu_margin_below_1e-3": int((margin < 1e-3).sum()),
            }
            say(f"agree {name} {label}: {100 * case[label]['identical_share']:.4f} % identical "
                f"({case[label]['pixels_differing']} px differ), max |dp| {case[label]['max_abs_prob_diff']:.2e}, "
                f"CPU margin where differing <= {case[label]['cpu_margin_where_differing_max']}")
        out[name] = case
        save("agree", out)


# ------------------------------------------------------------------------------------------- the scenes


def make_cog(path: Path, size: int, seed: int) -> float:
    """A ``size`` x ``size`` 3-band uint8 COG (deflate, 512 px tiles, overviews): parcels plus noise."""
    import numpy as np
    import rasterio
    import rasterio.shutil
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    t0 = time.perf_counter()
    tmp = path.with_suffix(".tmp.tif")
    rng = np.random.default_rng(seed)
    profile = dict(driver="GTiff", width=size, height=size, count=3, dtype="uint8", crs="EPSG:32633",
                   transform=from_origin(400_000.0, 5_000_000.0, 0.5, 0.5), tiled=True, blockxsize=512,
                   blockysize=512, bigtiff="YES")
    cell, rows = 64, 2048
    # parcels of 64 px in random colours, plus noise from one 2048 px tile shifted per block: fast to make
    coarse = rng.integers(40, 200, size=(3, -(-size // cell), -(-size // cell)), dtype=np.uint8)
    noise = rng.integers(0, 40, size=(3, rows, rows + 64), dtype=np.uint8)
    with rasterio.open(tmp, "w", **profile) as dst:
        for i, r0 in enumerate(range(0, size, rows)):
            h = min(rows, size - r0)
            block = np.repeat(np.repeat(coarse[:, r0 // cell:(r0 + h + cell - 1) // cell], cell, axis=1), cell,
                              axis=2)[:, :h, :size]
            for c0 in range(0, size, rows):
                w = min(rows, size - c0)
                block[:, :, c0:c0 + w] += noise[:, :h, (i * 7 + c0 // rows) % 64:][:, :, :w]
            dst.write(block, window=Window(0, r0, size, h))
    with rasterio.Env(GDAL_NUM_THREADS="ALL_CPUS"):
        rasterio.shutil.copy(tmp, path, driver="COG", COMPRESS="DEFLATE", PREDICTOR="2", BLOCKSIZE=512,
                             NUM_THREADS="ALL_CPUS", BIGTIFF="IF_SAFER")
    tmp.unlink()
    return time.perf_counter() - t0


def make_bundle(path: Path, encoder: str, chip: int, overlap: int) -> Path:
    """A U-Net bundle with random weights (no download), as ``bench_cluster.py`` makes it."""
    import torch

    from geoseg.model.bundle import ArchSpec, ClassInfo, Contract, InputSpec, save_bundle
    from geoseg.model.networks import build_network

    contract = Contract(
        name=f"bench-unet-{encoder}", model=ArchSpec(architecture="unet", encoder=encoder, params={}),
        input=InputSpec(bands=["red", "green", "blue"], mean=[120.0] * 3, std=[50.0] * 3),
        classes=[ClassInfo(id=i + 1, name=f"class {i + 1}", color=(40 * i % 256, 90, 200)) for i in range(N_CLASSES)],
        chip_size=chip, overlap=overlap,
    )
    torch.manual_seed(0)
    net = build_network(contract)
    net.eval()
    save_bundle(path, contract, net, overwrite=True)
    return path


def step_make(args: argparse.Namespace) -> None:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    made: dict[str, Any] = {}
    make_bundle(work / "unet34", args.encoder, 512, 128)
    for key, size in (("scene", args.size), ("cpu_scene", args.cpu_size)):
        p = work / f"scene{size}.tif"
        if not p.exists():
            s = make_cog(p, size, seed=size)
            say(f"made {p} ({size} x {size}, {p.stat().st_size / 1e6:.0f} MB) in {s:.1f} s")
            made[key] = {"path": str(p), "size": size, "mb": round(p.stat().st_size / 1e6, 1), "seconds": round(s, 1)}
    save("make", made)


# ---------------------------------------------------------------------------------------- bare network


def step_bare(args: argparse.Namespace) -> None:
    import torch

    import geoseg.predict.hardware as hw
    from geoseg.model.bundle import load_model
    from geoseg.predict.inference import Predictor

    if DEVICE != "cuda":
        say("bare: skipped (no CUDA in this rehearsal)")
        return
    loaded = load_model(Path(args.work) / "unet34")
    res: dict[str, Any] = {}
    pred = Predictor(loaded, "cuda", "bf16")
    t0 = time.perf_counter()
    res["auto_batch_bf16"] = hw.gpu_batch_size(pred, 512, 3)
    res["cudnn_allow_tf32_after"] = torch.backends.cudnn.allow_tf32
    res["auto_batch_probe_seconds"] = round(time.perf_counter() - t0, 2)
    say(f"--batch-size auto on this GPU (bf16, 512 px): {res['auto_batch_bf16']}")
    deadline = time.perf_counter() + args.budget
    preds = {prec: Predictor(loaded, "cuda", prec) for prec in ("bf16", "fp32")}
    plan = [(p.split(":")[0], int(p.split(":")[1])) for p in args.bare_plan] if args.bare_plan else [
        ("bf16", 32), ("bf16", 8), ("bf16", 16), ("fp32", 32), ("bf16", 64), ("bf16", 1), ("fp32", 8), ("bf16", 4)]
    for prec, b in plan:
        if time.perf_counter() > deadline:
            break
        pred = preds[prec]
        try:
            x = torch.randn(b, 3, 512, 512, device="cuda").contiguous(memory_format=torch.channels_last)
            torch.cuda.reset_peak_memory_stats()
            with torch.inference_mode():
                for _ in range(3):  # cuDNN picks its kernels for this shape here
                    pred.forward(x)
                torch.cuda.synchronize()
                times = []
                for _ in range(max(3, 64 // b)):
                    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    e0.record()
                    pred.forward(x)
                    e1.record()
                    e1.synchronize()
                    times.append(e0.elapsed_time(e1) / 1000)
            del x
        except torch.cuda.OutOfMemoryError as exc:
            res[f"{prec} b{b}"] = {"error": f"out of memory: {exc}"[:200]}
            torch.cuda.empty_cache()
            continue
        times.sort()
        t = times[len(times) // 2]
        res[f"{prec} b{b}"] = {"ms_per_batch": round(1000 * t, 2), "chips_per_s": round(b / t, 1),
                               "mpix_per_s": round(b * 512 * 512 / t / 1e6, 1),
                               "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20)}
        say(f"bare {prec} batch {b}: {1000 * t:.1f} ms, {b / t:.0f} chips/s, {b * 0.262144 / t:.0f} Mpix/s")
        save("bare", res)
        pred.check_overflow()
    del preds
    torch.cuda.empty_cache()
    # host <-> device copies of one batch of 32 (pinned), as the model server makes them
    b = 32
    host_in = torch.empty((b, 3, 512, 512), pin_memory=True)
    host_out = torch.empty((b, N_CLASSES, 512, 512), pin_memory=True)
    dev_out = torch.rand((b, N_CLASSES, 512, 512), device="cuda")
    for label, fn in (("h2d 32 chips", lambda: host_in.to("cuda", non_blocking=True)),
                      ("d2h 32 probs", lambda: host_out.copy_(dev_out, non_blocking=True))):
        fn()
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(5):
            fn()
        e1.record()
        e1.synchronize()
        s = e0.elapsed_time(e1) / 5000
        nbytes = (host_in if label.startswith("h2d") else host_out).numel() * 4
        res[label] = {"ms": round(1000 * s, 2), "gb_per_s": round(nbytes / s / 1e9, 1)}
    t0 = time.perf_counter()
    host_out.numpy().copy()
    res["host copy of 32 probs (numpy)"] = {"ms": round(1000 * (time.perf_counter() - t0), 1)}
    say(f"copies: {json.dumps({k: v for k, v in res.items() if 'copy' in k or '32' in k})}")
    save("bare", res)


# ----------------------------------------------------------------------------------- instrumented runs


class Sampler:
    """``nvidia-smi`` every 200 ms and this process's RSS every 50 ms, while a run lasts."""

    def __init__(self, name: str):
        self.name = name
        SMI.mkdir(parents=True, exist_ok=True)
        self.csv = SMI / f"{name}.csv"  # gpu_check.sh gathers these into one file under OUT
        self.rss_peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> Sampler:
        import psutil

        self._proc = None
        with contextlib.suppress(OSError):
            self._fh = open(self.csv, "w")
            self._proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=timestamp,utilization.gpu,memory.used,power.draw,clocks.sm",
                 "--format=csv,noheader,nounits", "-lms", "200"], stdout=self._fh, stderr=subprocess.DEVNULL)
        me = psutil.Process()

        def rss() -> None:
            while not self._stop.wait(0.05):
                self.rss_peak = max(self.rss_peak, me.memory_info().rss)

        self._thread = threading.Thread(target=rss, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()
            self._fh.close()

    def summary(self) -> dict[str, Any]:
        util, mem = [], []
        with contextlib.suppress(OSError):
            for line in self.csv.read_text().splitlines():
                parts = [p.strip() for p in line.split(",")]
                with contextlib.suppress(ValueError, IndexError):
                    util.append(float(parts[1]))
                    mem.append(float(parts[2]))
        out: dict[str, Any] = {"host_rss_peak_mb": round(self.rss_peak / 1e6)}
        if util:
            busy = [u for u in util if u > 0]
            out.update(smi_samples=len(util), smi_util_mean=round(sum(util) / len(util), 1),
                       smi_util_mean_while_nonzero=round(sum(busy) / max(1, len(busy)), 1),
                       smi_memory_used_max_mib=max(mem))
        return out


def _before_finite(pred: Any, logits: Any) -> Any:
    """``Predictor._finite`` before issue 25: a host sync on every batch (``bool`` of a device tensor)."""
    import torch

    if bool(torch.isfinite(logits).all()):
        return logits
    big = torch.finfo(torch.float32).max
    return torch.nan_to_num(logits, nan=-big, posinf=big, neginf=-big)


_SAVED: dict[str, Any] = {}


class StackSampler:
    """Where each group of threads is, every ``interval`` s: the innermost geoseg line of its stack (a thread
    in a C call that released the GIL, GDAL's read or a numpy loop, shows the line that called it)."""

    def __init__(self, on: bool, interval: float = 0.02):
        self.on, self.interval = on, interval
        self.counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.samples = 0
        self._stop = threading.Event()

    def __enter__(self) -> StackSampler:
        if self.on:
            self._thread = threading.Thread(target=self._run, daemon=True, name="stack-sampler")
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.on:
            self._stop.set()
            self._thread.join()

    def _run(self) -> None:
        import re

        me = threading.get_ident()
        while not self._stop.wait(self.interval):
            names = {t.ident: t.name for t in threading.enumerate()}
            self.samples += 1
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                group = re.sub(r"[_-]\d+$", "", names.get(ident, "?"))
                f: Any = frame
                where = None
                while f is not None:
                    name = f.f_code.co_filename
                    if "/geoseg/" in name:
                        where = f"{Path(name).name}:{f.f_code.co_name}:{f.f_lineno}"
                        break
                    f = f.f_back
                if where is None:
                    where = f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}"
                self.counts[group][where] += 1

    def summary(self, top: int = 8) -> dict[str, Any]:
        return {g: {"thread_samples": sum(c.values()),
                    "top": {k: round(v / sum(c.values()), 3) for k, v in c.most_common(top)}}
                for g, c in self.counts.items() if g.startswith(("geoseg", "Main"))}


class Instrument:
    """Times the model thread's work and the GPU's, by wrapping :class:`~geoseg.predict.inference.ModelServer`."""

    def __init__(self, variant: str = "branch"):
        # "branch": the code as it is; "before": _finite as before issue 25 (a host sync per batch);
        # "slots8": 8 batches of chips in flight instead of 3
        self.variant = variant
        self.t = collections.Counter()
        self.events: list[tuple[Any, Any]] = []
        self.batches: list[int] = []
        self.first: float | None = None
        self.last = 0.0

    def __enter__(self) -> Instrument:
        import torch

        from geoseg.predict.api import inference as inf
        self._saved = (inf.ModelServer._gather, inf.ModelServer._launch, inf.ModelServer._finish,
                       inf.Predictor.forward, inf.Predictor._finite)
        gather, launch, finish, forward, finite = self._saved
        _SAVED.update(launch=launch, finish=finish)
        me = self

        def _gather(server: Any) -> Any:
            t0 = time.perf_counter()
            items, stop = gather(server)
            me.t["wait for chips"] += time.perf_counter() - t0
            if items:
                me.batches.append(len(items))
            return items, stop

        def _launch(server: Any, items: Any, slot: int) -> Any:
            t0 = time.perf_counter()
            if me.first is None:
                me.first = t0
            r = launch(server, items, slot)
            me.t["prepare + launch"] += time.perf_counter() - t0
            return r

        def _finish(server: Any, items: Any, launched: Any) -> None:
            t0 = time.perf_counter()
            if server._cuda and launched is not None:
                launched[2].synchronize()
            t1 = time.perf_counter()
            finish(server, items, launched)
            t2 = time.perf_counter()
            me.t["wait for GPU"] += t1 - t0
            me.t["copy out + hand over"] += t2 - t1
            me.last = t2

        def _forward(pred: Any, x: Any) -> Any:
            if x.device.type != "cuda":
                return forward(pred, x)
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            r = forward(pred, x)
            e1.record()
            me.events.append((e0, e1))
            return r

        inf.ModelServer._gather = _gather  # type: ignore[method-assign]
        inf.ModelServer._launch = _launch  # type: ignore[method-assign]
        inf.ModelServer._finish = _finish  # type: ignore[method-assign]
        inf.Predictor.forward = _forward  # type: ignore[method-assign]
        if self.variant == "before":
            inf.Predictor._finite = _before_finite  # type: ignore[method-assign]
        from geoseg.predict.api import engine
        self._runtime_init = engine.Runtime.__init__
        if self.variant == "slots8":
            init = self._runtime_init

            def _init(rt: Any, model: Any, options: Any) -> None:
                init(rt, model, options)
                rt.slots = threading.Semaphore(8 * rt.server.batch_size)

            engine.Runtime.__init__ = _init  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        from geoseg.predict.api import inference as inf
        (inf.ModelServer._gather, inf.ModelServer._launch, inf.ModelServer._finish, inf.Predictor.forward,
         inf.Predictor._finite) = self._saved
        from geoseg.predict.api import engine
        engine.Runtime.__init__ = self._runtime_init  # type: ignore[method-assign]

    def summary(self) -> dict[str, Any]:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        gpu = sum(a.elapsed_time(b) for a, b in self.events) / 1000
        span = (self.last - self.first) if self.first is not None else 0.0
        n = len(self.batches)
        return {"model_thread_seconds": {k: round(v, 2) for k, v in self.t.items()},
                "model_span_s": round(span, 2), "gpu_network_s": round(gpu, 2),
                "gpu_busy_of_model_span": round(gpu / span, 3) if span else None,
                "batches": n, "mean_batch_fill": round(sum(self.batches) / n, 2) if n else None}


def run_predict(label: str, scene: str, bundle: str, out: Path, options: dict[str, Any], variant: str = "branch",
                cli: list[str] | None = None, profile: bool = False) -> dict[str, Any]:
    import torch

    from geoseg.predict.report import run_report

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    rpath = out / "report.json"
    import resource

    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    with Sampler(label.replace(" ", "_")) as smp_, Instrument(variant) as ins, StackSampler(profile) as stacks:
        t0 = time.perf_counter()
        if cli is not None:
            from geoseg.cli import main

            with contextlib.suppress(SystemExit):
                main(["-q", "predict", scene, "--model", bundle, "--output-dir", str(out), "--report", str(rpath),
                      "--overwrite", "--no-vector", *cli], standalone_mode=False)
            rep = json.loads(rpath.read_text())
        else:
            from geoseg.predict.api import predict_scenes

            run = predict_scenes([scene], bundle, out, overwrite=True, vector_format=None, **options)
            rep = run_report(run)
        wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    mpix = rep["megapixels"]
    res: dict[str, Any] = {
        "wall_s": round(wall, 2), "mpix": mpix, "mpix_per_s": round(mpix / wall, 2),
        "report_seconds": rep["seconds"], "report_mpix_per_s": rep["mpix_per_s"],
        "stage_seconds": rep["stage_seconds"], "settings": {k: rep["settings"].get(k) for k in (
            "batch_size", "precision", "device", "amp", "workers", "panel_width", "unit_rows", "tile_size",
            "overlap", "scheduler")},
        "chips": rep["outputs"][0]["chips_computed"], "status": rep["status"],
        "host_cpu_s": round(cpu_s, 1), "host_cores_busy": round(cpu_s / wall, 2),
        "peak_gpu_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20) if torch.cuda.is_available() else None,
        **smp_.summary(), **ins.summary(),
    }
    if profile:
        res["stack_profile"] = stacks.summary()
        res["stack_samples"] = stacks.samples
        for g, v in res["stack_profile"].items():
            say(f"  profile {g}: {json.dumps(v['top'])}")
    if res["chips"] and res["gpu_network_s"]:
        res["model_stage_mpix_per_s_gpu_time"] = round(res["chips"] * 512 * 512 / 1e6 / res["gpu_network_s"], 1)
    if res["chips"] and res["model_span_s"]:
        res["model_stage_mpix_per_s_span"] = round(res["chips"] * 512 * 512 / 1e6 / res["model_span_s"], 1)
    say(f"{label}: {wall:.1f} s, {res['mpix_per_s']:.1f} Mpix/s end to end; stages {res['stage_seconds']}; "
        f"GPU busy {res['gpu_busy_of_model_span']} of the model span ({res['gpu_network_s']} s of "
        f"{res['model_span_s']} s), smi {res.get('smi_util_mean')} %; model thread {res['model_thread_seconds']}; "
        f"batches {res['batches']} (mean fill {res['mean_batch_fill']}); peak GPU {res['peak_gpu_allocated_mib']} MiB, "
        f"host {res['host_rss_peak_mb']} MB, {res['host_cores_busy']} cores busy")
    return res


def step_speed(args: argparse.Namespace) -> None:
    work = Path(args.work)
    scene, bundle = str(work / f"scene{args.size}.tif"), str(work / "unet34")
    wide = {"workers": 16, "panel_width": 2048}
    plan: list[tuple[str, dict[str, Any], str, list[str] | None]] = [
        ("cli defaults", {}, "branch", ["--device", DEVICE]),
        ("wide", {"device": DEVICE, **wide}, "branch", None),
        ("wide, 8 batches in flight", {"device": DEVICE, **wide}, "slots8", None),
        ("wide, profiled", {"device": DEVICE, **wide}, "branch", None),
        ("defaults", {"device": DEVICE}, "branch", None),
        ("wide, sync per batch (before)", {"device": DEVICE, **wide}, "before", None),
        ("wide batch 8", {"device": DEVICE, "batch_size": 8, **wide}, "branch", None),
        ("wide fp32", {"device": DEVICE, "precision": "fp32", **wide}, "branch", None),
        ("defaults, sync per batch (before)", {"device": DEVICE}, "before", None),
        ("wide batch 16", {"device": DEVICE, "batch_size": 16, **wide}, "branch", None),
    ]
    if args.only:
        plan = sorted((p for p in plan if p[0] in args.only), key=lambda p: args.only.index(p[0]))
    deadline = time.perf_counter() + args.budget
    results: dict[str, Any] = {}
    last = 0.0
    for label, opts, variant, cli in plan:
        left = deadline - time.perf_counter()
        if left < 1.3 * last:
            say(f"skipped {label}: {left:.0f} s of the budget left, the last run took {last:.0f} s")
            results[label] = {"skipped": f"budget ({left:.0f} s left)"}
            continue
        try:
            r = run_predict(label, scene, bundle, work / "out" / label.replace(" ", "_").replace(",", ""), opts,
                            variant, cli, profile="profiled" in label)
        except Exception as exc:  # one failing configuration must not lose the others' figures
            say(f"{label} FAILED: {type(exc).__name__}: {exc}")
            r = {"error": f"{type(exc).__name__}: {exc}"}
        last = r.get("wall_s", last)
        results[label] = r
        save("speed", results)


# -------------------------------------------------------------------------------------------- CPU scaling


def step_cpu(args: argparse.Namespace) -> None:
    from geoseg.predict.api import predict_scenes

    work = Path(args.work)
    src, bundle = work / f"scene{args.cpu_size}.tif", str(work / "unet34")
    # one job of --cpu-scenes scenes (links to one file): one unit each at the default panel width, so that
    # N workers have N units to share without splitting scenes (which would recompute chips at unit edges)
    (work / "cpu").mkdir(parents=True, exist_ok=True)
    scenes = []
    for i in range(args.cpu_scenes):
        link = work / "cpu" / f"s{i}.tif"
        if not link.exists():
            link.symlink_to(src)
        scenes.append(str(link))
    deadline = time.perf_counter() + args.budget
    results: dict[str, Any] = {"scenes": len(scenes), "scene_size": args.cpu_size}
    last = 0.0
    for sched in [f"local:{n}" for n in args.ns] + ["threads"]:
        left = deadline - time.perf_counter()
        if left < 1.2 * last:
            results[sched] = {"skipped": f"budget ({left:.0f} s left)"}
            say(f"skipped {sched}: {left:.0f} s left")
            continue
        t_start = time.perf_counter()
        client: Any = sched
        dask_sched = None
        if args.warm and sched != "threads":
            from geoseg.predict.schedule import open_dask

            dask_sched = open_dask(sched)
            client = dask_sched.client
        started = time.perf_counter() - t_start
        try:
            for rep in range(2 if args.warm else 1):
                with Sampler(f"cpu-{sched.replace(':', '')}-{rep}") as s:
                    t0 = time.perf_counter()
                    try:
                        run = predict_scenes(scenes, bundle, work / "cpu" / f"{sched.replace(':', '')}-{rep}",
                                             overwrite=True, vector_format=None, device="cpu", scheduler=client,
                                             quicklook=False)
                    except Exception as exc:
                        results[sched] = {"error": f"{type(exc).__name__}: {exc}"}
                        say(f"{sched} FAILED: {exc}")
                        save("cpu", results)
                        break
                    wall = time.perf_counter() - t0
                mpix = run.pixels / 1e6
                last = wall + started
                chips = sum(x.chips_computed for x in run.scenes)
                key = sched if not args.warm else f"{sched} {'cold' if rep == 0 else 'warm'}"
                results[key] = {"wall_s": round(wall, 2), "mpix_per_s": round(mpix / wall, 3), "chips": chips,
                                "cluster_start_s": round(started, 2) if dask_sched is not None else None,
                                "workers": run.workers, "precision": run.options.precision,
                                "batch_size": run.options.batch_size, "machine": run.machine,
                                "stage_seconds": {k: round(v, 2) for k, v in run.stage_seconds.items()},
                                "driver_rss_peak_mb": s.summary()["host_rss_peak_mb"]}
                say(f"cpu {key}: {wall:.1f} s (+{started:.1f} s to start the cluster), {mpix / wall:.2f} Mpix/s, "
                    f"{chips} chips, {run.options.precision} batch {run.options.batch_size}, "
                    f"stages {results[key]['stage_seconds']}")
                save("cpu", results)
        finally:
            if dask_sched is not None:
                dask_sched.close()


# ----------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["env", "agree", "make", "bare", "speed", "cpu"])
    ap.add_argument("--work", default="/tmp/gpuwork", help="scenes, bundle and outputs")
    ap.add_argument("--size", type=int, default=16384)
    ap.add_argument("--cpu-size", type=int, default=1536)
    ap.add_argument("--cpu-scenes", type=int, default=8, help="scenes (links to one) in each CPU job")
    ap.add_argument("--ns", type=int, nargs="*", default=[1, 2, 4, 8])
    ap.add_argument("--encoder", default="resnet34")
    ap.add_argument("--budget", type=float, default=120.0, help="seconds this step may start runs in")
    ap.add_argument("--only", nargs="*", default=None, help="speed: only these runs (labels)")
    ap.add_argument("--agree-batch", type=int, default=8)
    ap.add_argument("--agree-variants", nargs="*", default=None, help="agree: only these CUDA runs (labels)")
    ap.add_argument("--bare-plan", nargs="*", default=None, help="bare: PRECISION:BATCH pairs, in order")
    ap.add_argument("--warm", action="store_true", help="cpu: start each cluster once, time a cold then a warm job")
    ap.add_argument("--demo-bundle")
    ap.add_argument("--demo-scene")
    ap.add_argument("--spacenet-bundle")
    ap.add_argument("--spacenet-scene")
    args = ap.parse_args()
    {"env": step_env, "agree": step_agree, "make": step_make, "bare": step_bare, "speed": step_speed,
     "cpu": step_cpu}[args.step](args)


if __name__ == "__main__":
    main()
