"""geoseg side by side with the peer geo-inference (NRCan): one network, one scene, every geoseg backend and
precision next to geo-inference, in one run.

Rows, each its own process (so each peak memory is its own), in this order and interleaved ``--repeats`` times:

- ``geoseg PyTorch fp32``: :func:`geoseg.predict.api.predict_scenes` on the bundle, ``--precision fp32``, no
  polygons. The reference of the agreement column.
- ``geoseg defaults (PyTorch auto)``: the same at ``--precision auto`` (bf16 on a CPU with AMX, else fp32).
- ``geoseg --overlap 256``: the defaults at stride 256, the fixed 50 % overlap geo-inference uses.
- ``geoseg ONNX Runtime fp32`` / ``int8``: the bundle exported with ``geoseg export --format onnx`` (and
  ``--int8``, calibrated on chips of the scene), predicted through the torch-free path (numpy + ONNX Runtime;
  "[torch loaded]" in the row if torch was imported after all).
- ``geoseg OpenVINO fp32`` / ``int8``: the same two exports with ``--backend openvino``, when the openvino
  package is importable (``--no-openvino`` skips them).
- ``geo-inference``: its command line at its defaults on the same scene, ``-ps 512``, the same network as
  TorchScript, on the CPU (``geo_inference -i SCENE -m MODEL.pt -wd D -ps 512 -cls N -d cpu``), measured with
  ``/usr/bin/time -v`` (or ``resource.getrusage(RUSAGE_CHILDREN)`` in a small wrapper where that is absent).

The geoseg rows reuse ``bench_pipeline``'s children, run as its ``_child`` runs them: ``child_predict`` (the
run), ``child_bare`` / ``child_bare_onnx`` (the bare forward: the network alone on exactly the chips predict
computes, read and normalised before the clock starts, at the precision, batch size and threads predict
resolves, in the same runtime) and ``child_export``; the class maps are compared with its ``_agreement``.

Columns: ``wall s``, the whole process timed from here (interpreter start-up, imports, model load, the run;
what geo-inference's figure also holds); ``peak MB``, the process's ru_maxrss; ``GI/this s`` and ``GI/this MB``,
geo-inference's over the row's (above 1: geoseg faster or smaller); ``predict s``, the run inside the process;
``bare s``, the bare forward; ``effic.``, predict s / bare s (the pipeline's cost over the network's); ``agree
fp32``, the share of pixels whose class equals that of the PyTorch fp32 row (nodata included); ``agree GI``,
the share of pixels valid in both where geoseg's class id equals geo-inference's (it writes 0-based indexes,
255 = nodata: its ``k`` is the bundle's ``k``-th class id); ``grid``, whether the output's CRS, transform,
width and height equal the scene's. An int8 network that agrees with fp32 on less than 99.5 % of the first
batch's pixels refuses itself: its row says "refused: <reason>" (and gets no bare forward); a child that
fails says "failed: <its last error line>". Neither stops the benchmark.

Inputs, made in a child process (the parent never imports torch nor holds a scene: on Linux a process's
ru_maxrss can start from that of the process it was forked from):

- a synthetic 3-band uint8 scene and its labels (classes 1..5, nodata 0) from
  :func:`geoseg.learn.synthetic.make_scene` (EPSG:32633, 1 m, a nodata triangle top left), ``--size`` square;
- the network, one of:
  - ``--train-seconds S`` (default 600): ``geoseg train`` (its Python API) on that scene and its labels for
    ``max_seconds`` S: U-Net resnet18 from scratch (``encoder_weights`` None), 512 px chips, 128 px overlap,
    normalisation from the data, the config's other defaults. int8 needs a trained network: with random
    weights the classes are near ties and int8 always refuses itself, and a short run is still a weak
    network: on 2 cores (1024 px scene) int8 agreed with fp32 on 84 % of the first batch after 60 s, 98.4 %
    after 240 s (both refused), 99.97 % after 600 s (accepted);
  - ``--train-seconds 0``: random weights as before (seed ``--seed``, 6 classes, mean 0, std 255);
  - ``--model BUNDLE``: a bundle of yours (3 bands, 512 px chips; its own classes, overlap and normalisation).
- geo-inference applies no normalisation: it hands each chip to the model as read (``torch.as_tensor`` of the
  uint8 array). So its TorchScript file is the bundle's TorchScript export (:func:`geoseg.model.export.export`)
  inside a scripted module that casts to float32 and applies the bundle's own normalisation, ``(x - mean) *
  (1 / std)``, the float32 operations geoseg's reader does with the bundle's ``input.mean`` and ``input.std``;
  the maximum |logit difference| between that file on raw uint8 and the bundle on geoseg's normalised input is
  printed (0 expected). ``-cls`` is the bundle's class count.

The two blend differently (geoseg: cosine-weighted mean of softmax probabilities; geo-inference: Hann-weighted
mean of logits), so agreement with geo-inference below 100 % near chip borders is expected, the more so the
weaker the network.

    python benchmarks/bench_peer.py                           # 4096 x 4096, 600 s of training (~20 min, 2 cores)
    python benchmarks/bench_peer.py --size 1024 --train-seconds 60 --keep   # quick look (~3 min)
    python benchmarks/bench_peer.py --repeats 2 --json peer.json
    python benchmarks/bench_peer.py --model runs/x/model                    # your bundle, no training

geo-inference lives in its own virtual environment (``--venv``; made with ``python -m venv`` and ``pip install
geo-inference==3.2.4`` on first use, about 2 min, reused afterwards), so its pins never touch ours. Only if that
clean install fails is the venv made again with ``--system-site-packages``.

``--cpu-isa NAME`` caps oneDNN's instruction set for every row, geo-inference's included (``ONEDNN_MAX_CPU_ISA``,
read by PyTorch's and OpenVINO's CPU kernels and by geoseg's ``--precision auto``): ``--cpu-isa AVX512_CORE_BF16``
runs an AMX machine as a CPU with AVX-512 VNNI and BF16 but no AMX. ONNX Runtime's kernels do not read it (its
int8 convolutions use VNNI, not AMX; its float32 neither).

With ``--repeats N`` each row runs N times (interleaved); the table shows the fastest times and the largest
peak. Timings on a shared machine are noisy: compare ratios within one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GI_SPEC = "geo-inference==3.2.4"
DEFAULT_VENV = Path(tempfile.gettempdir()) / "geoseg-bench-geo-inference-venv"
CHIP, OVERLAP = 512, 128
RANDOM_CLASSES, RANDOM_MEAN, RANDOM_STD = 6, [0.0, 0.0, 0.0], [255.0, 255.0, 255.0]  # --train-seconds 0
TIME = Path("/usr/bin/time")

# Measures a command when /usr/bin/time is absent: ru_maxrss of the only child this small process waits for.
_RUSAGE_WRAPPER = r'''
import json, resource, subprocess, sys
rc = subprocess.run(sys.argv[2:]).returncode
with open(sys.argv[1], "w") as f:
    json.dump({"peak_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}, f)
sys.exit(rc)
'''


# ------------------------------------------------------------------------------ geo-inference's venv


def _venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _venv_versions(venv: Path) -> dict | None:
    """Versions of geo-inference and torch inside ``venv``, or None when geo-inference is not importable."""
    py = _venv_python(venv)
    if not py.exists():
        return None
    code = ("import json, importlib.metadata as m, torch, geo_inference; "
            "print(json.dumps({'geo_inference': m.version('geo-inference'), 'torch': torch.__version__}))")
    res = subprocess.run([str(py), "-c", code], capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else None


def ensure_venv(venv: Path, spec: str) -> dict:
    """Reuse ``venv`` if geo-inference imports there, else create it and ``pip install spec`` into it."""
    found = _venv_versions(venv)
    if found:
        print(f"reusing {venv} (geo-inference {found['geo_inference']}, torch {found['torch']})", flush=True)
        return {"path": str(venv), "created": False, "system_site_packages": _system_site(venv), **found}
    log = venv.with_name(venv.name + "-install.log")
    for system_site in (False, True):
        if venv.exists():
            shutil.rmtree(venv)
        how = " with --system-site-packages" if system_site else ""
        print(f"creating {venv}{how} and installing {spec} (log: {log}) ...", flush=True)
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "venv", str(venv)] + (["--system-site-packages"] if system_site else [])
        with open(log, "a") as f:
            ok = (subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode == 0
                  and subprocess.run([str(_venv_python(venv)), "-m", "pip", "install", spec],
                                     stdout=f, stderr=subprocess.STDOUT).returncode == 0)
        found = _venv_versions(venv) if ok else None
        if found:
            print(f"  installed in {time.perf_counter() - t0:.0f} s: geo-inference {found['geo_inference']}, "
                  f"torch {found['torch']}", flush=True)
            return {"path": str(venv), "created": True, "system_site_packages": system_site, **found}
        print(f"  failed{how}; see {log}", flush=True)
    raise SystemExit(f"could not install {spec} into {venv}; see {log}")


def _system_site(venv: Path) -> bool:
    cfg = venv / "pyvenv.cfg"
    return cfg.exists() and "include-system-site-packages = true" in cfg.read_text()


# ------------------------------------------------------------------------------ inputs (child process)


def make_inputs(work: Path, size: int, seed: int, train_seconds: float, model: Path | None) -> dict:
    """Generate the scene, the bundle (trained, random or ``model``) and geo-inference's TorchScript in a child
    process; returns their paths and the bundle's classes and normalisation.

    On Linux a process's ru_maxrss can start from the memory of the process it was forked from, so the
    parent, which starts the measured runs, never imports torch nor holds a scene.
    """
    code = (f"import sys, json; sys.path[:0] = [{str(HERE)!r}, {str(REPO)!r}]; from bench_peer import _make_inputs; "
            f"_make_inputs(*json.loads(sys.argv[1]))")
    arg = json.dumps([str(work), size, seed, train_seconds, str(model) if model else None])
    res = subprocess.run([sys.executable, "-c", code, arg], check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _train(work: Path, scene: Path, labels: Path, seconds: float, seed: int) -> Path:
    """``geoseg train`` (its Python API) on the scene and its labels for ``seconds``: U-Net resnet18 from
    scratch, 512 px chips, 128 px overlap, normalisation from the data; returns the bundle."""
    from geoseg.learn.synthetic import CLASSES
    from geoseg.learn.train import train

    config = {
        "classes": [{"id": c.id, "name": c.name, "color": list(c.color)} for c in CLASSES],
        "data": {"scenes": [{"image": str(scene), "labels": str(labels)}], "chip_size": CHIP, "overlap": OVERLAP},
        "model": {"architecture": "unet", "encoder": "resnet18", "encoder_weights": None},
        "max_seconds": seconds, "seed": seed, "device": "cpu", "plots": False, "tensorboard": False,
        "preview_chips": 0,
    }
    t0 = time.perf_counter()
    result = train(config, work / "train", overwrite=True)
    print(f"trained for {time.perf_counter() - t0:.0f} s ({result.stopped_by}, {result.chips_seen} chips seen, "
          f"{result.epochs_run} epochs; validation {result.metrics})", file=sys.stderr, flush=True)
    return result.bundle_path


def _make_inputs(work_dir: str, size: int, seed: int, train_seconds: float, model: str | None) -> None:
    import warnings

    import numpy as np
    import torch

    from geoseg.learn.synthetic import make_scene
    from geoseg.model.bundle import save_bundle
    from geoseg.model.contract import ArchSpec, ClassInfo, Contract, InputSpec
    from geoseg.model.export import export
    from geoseg.model.networks import build_network
    from geoseg.model.weights import load_model

    warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream; geo-inference needs it
    work = Path(work_dir)
    t0 = time.perf_counter()
    made = make_scene(work / "scene.tif", work / "labels.tif", size, seed=seed)
    scene = made.image
    print(f"generated a {size}x{size} scene in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    if model:
        bundle, weights = Path(model), f"given ({model})"
    elif train_seconds > 0:
        bundle, weights = _train(work, scene, made.labels, train_seconds, seed), f"trained {train_seconds:g} s"
    else:
        contract = Contract(
            name="unet-resnet18-random", model=ArchSpec(architecture="unet", encoder="resnet18"),
            input=InputSpec(bands=["red", "green", "blue"], mean=RANDOM_MEAN, std=RANDOM_STD),
            classes=[ClassInfo(id=i + 1, name=f"class {i + 1}", color=(40 * i % 256, 90, 200))
                     for i in range(RANDOM_CLASSES)],
            chip_size=CHIP, overlap=OVERLAP,
        )
        torch.manual_seed(seed)
        net = build_network(contract).eval()  # encoder_weights=None: random, seeded
        bundle, weights = save_bundle(work / "bundle", contract, net, overwrite=True).path, "random"
    loaded = load_model(bundle)
    c = loaded.contract
    exported = export(bundle, "torchscript", work / "bundle-torchscript", overwrite=True)

    class RawToLogits(torch.nn.Module):
        """Raw ``(N, C, H, W)`` as read (any dtype) -> logits, normalised exactly as geoseg's reader does."""

        def __init__(self, net: torch.nn.Module, mean: list[float], std: list[float]) -> None:
            super().__init__()
            self.net = net
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
            self.register_buffer("inv_std", (1.0 / torch.tensor(std, dtype=torch.float32)).view(1, -1, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net((x.to(torch.float32) - self.mean) * self.inv_std)  # type: ignore[operator]

    mean, std = [float(v) for v in c.input.mean], [float(v) for v in c.input.std]
    wrapped = torch.jit.script(RawToLogits(torch.jit.load(str(exported.model_path)), mean, std))
    gi_model = work / "unet-raw-input.torchscript.pt"
    wrapped.save(str(gi_model))

    # the wrapped file on raw uint8 must give what the bundle gives on geoseg's normalised input
    n_bands = len(c.input.bands)
    raw = np.random.default_rng(seed).integers(1, 256, (1, n_bands, c.chip_size, c.chip_size), dtype=np.uint8)
    m32 = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    inv32 = (np.float32(1.0) / np.asarray(std, np.float32)).reshape(1, -1, 1, 1)
    normalised = (raw.astype(np.float32) - m32) * inv32
    with torch.no_grad():
        ref = loaded.module(torch.from_numpy(normalised))
        got = torch.jit.load(str(gi_model))(torch.from_numpy(raw))
    diff = float((got - ref).abs().max())
    print(json.dumps({"scene": str(scene), "bundle": str(bundle), "gi_model": str(gi_model), "weights": weights,
                      "class_ids": [k.id for k in c.classes], "mean": mean, "std": std, "chip": c.chip_size,
                      "overlap": c.overlap, "encoder": c.model.encoder, "architecture": c.model.architecture,
                      "export_max_abs_diff": diff, "torch": torch.__version__}))


# ------------------------------------------------------------------------------ measured runs


def measured(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` with its output in ``log``; wall seconds (from here) and the child's peak RSS in MB."""
    stats = log.with_suffix(".rusage")
    if TIME.exists():
        full = [str(TIME), "-v", "-o", str(stats)] + cmd
    else:
        full = [sys.executable, "-c", _RUSAGE_WRAPPER, str(stats)] + cmd
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(full, stdout=f, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - t0
    text = stats.read_text() if stats.exists() else ""
    peak_kb = None
    if TIME.exists():
        for line in text.splitlines():
            if "Maximum resident set size" in line:
                peak_kb = int(line.rsplit(":", 1)[1])
    elif text:
        peak_kb = json.loads(text)["peak_kb"]
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise SystemExit(f"command failed (exit {rc}): {' '.join(cmd)}\n--- {log} (last lines) ---\n{tail}")
    return {"seconds": seconds, "peak_mb": peak_kb / 1024 if peak_kb is not None else None}


def run_child(fn: str, *args: Any) -> dict[str, Any]:
    """One of bench_pipeline's children in its own process (its ``_child``): its result, plus ``process_s``, the
    wall seconds of the whole process seen from here (interpreter, imports, model load, the run). A child that
    fails gives ``failed`` (the last line of its error) instead of stopping the benchmark."""
    import bench_pipeline

    t0 = time.perf_counter()
    try:
        r = bench_pipeline._child(fn, *args)
    except subprocess.CalledProcessError as exc:
        lines = [ln for ln in (exc.stderr or "").splitlines() if ln.strip()]
        r = {"failed": lines[-1] if lines else f"exit {exc.returncode}", "seconds": float("nan"),
             "peak_memory_mb": float("nan")}
    r["process_s"] = time.perf_counter() - t0
    return r


def run_geo_inference(venv: Path, scene: Path, model: Path, out: Path, n_classes: int, chip: int) -> tuple[dict, Path]:
    if out.exists():
        shutil.rmtree(out)  # its mask name carries a random suffix: start empty to find it
    out.mkdir(parents=True)
    exe = venv / ("Scripts/geo_inference.exe" if os.name == "nt" else "bin/geo_inference")
    cmd = [str(exe), "-i", str(scene), "-m", str(model), "-wd", str(out), "-ps", str(chip),
           "-cls", str(n_classes), "-d", "cpu"]
    res = measured(cmd, out / "run.log")
    masks = sorted(out.glob(f"{scene.stem}_mask_*.tif"))
    if len(masks) != 1:
        raise SystemExit(f"{out}: expected one {scene.stem}_mask_*.tif from geo-inference, found {masks}")
    return res, masks[0]


# ------------------------------------------------------------------------------ checks


def check_grid(scene: Path, output: Path) -> dict:
    """Does ``output`` sit on the scene's grid: same CRS, transform, width and height?"""
    import rasterio

    with rasterio.open(scene) as a, rasterio.open(output) as b:
        checks = {"crs": a.crs == b.crs, "transform": a.transform == b.transform,
                  "width": a.width == b.width, "height": a.height == b.height}
        detail = {"crs": str(b.crs), "transform": list(b.transform)[:6], "width": b.width, "height": b.height,
                  "nodata": b.nodata, "compress": b.compression.value if b.compression else None}
    return {"pass": all(checks.values()), "checks": checks, "output": detail}


def class_agreement(geoseg_map: Path, gi_map: Path, class_ids: list[int]) -> dict:
    """Share of pixels valid in both where geoseg's class id equals ``class_ids[k]`` for geo-inference's index ``k``
    (geo-inference writes 0-based indexes, 255 = nodata when the file names none)."""
    import numpy as np
    import rasterio

    with rasterio.open(geoseg_map) as g, rasterio.open(gi_map) as o:
        gs, other = g.read(1), o.read(1)
        g_nodata, o_nodata = g.nodata, o.nodata if o.nodata is not None else 255
    g_valid = gs != g_nodata if g_nodata is not None else np.ones(gs.shape, bool)
    o_valid = other != o_nodata
    both = g_valid & o_valid
    lut = np.full(256, -1, np.int32)
    lut[:len(class_ids)] = class_ids
    same = (gs.astype(np.int32) == lut[other]) & both
    n = int(both.sum())
    return {"agreement": float(same.sum()) / n if n else None, "pixels_compared": n,
            "validity_agreement": float((g_valid == o_valid).mean()),
            "classes_geoseg": np.unique(gs[g_valid]).tolist(),
            "classes_other_as_ids": np.unique(lut[other[o_valid]]).tolist()}


# ------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=4096, help="scene width and height in pixels [4096]")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each row (interleaved) [1]")
    ap.add_argument("--train-seconds", type=float, default=600.0,
                    help="train the U-Net this long on the scene before exporting (0: random weights) [600]")
    ap.add_argument("--model", type=Path, default=None,
                    help="a geoseg bundle (3-band, uint8-scaled input) instead of training one")
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV,
                    help=f"geo-inference's virtual environment, made on first use [{DEFAULT_VENV}]")
    ap.add_argument("--gi-spec", default=GI_SPEC, help=f"what pip installs into a new venv [{GI_SPEC}]")
    ap.add_argument("--seed", type=int, default=0, help="seed of the scene, the training and random weights [0]")
    ap.add_argument("--no-openvino", action="store_true", help="skip the OpenVINO rows")
    ap.add_argument("--keep", action="store_true", help="keep the scene, bundles, exports and outputs")
    ap.add_argument("--json", type=Path, default=None, help="write the results to this file")
    ap.add_argument("--cpu-isa", default=None, metavar="NAME",
                    help="cap oneDNN's instruction set in every row (ONEDNN_MAX_CPU_ISA), e.g. AVX512_CORE_BF16: "
                         "a CPU without AMX")
    args = ap.parse_args()
    if args.cpu_isa:
        os.environ["ONEDNN_MAX_CPU_ISA"] = args.cpu_isa.upper()  # the children inherit it

    venv = ensure_venv(args.venv.resolve(), args.gi_spec)
    work = Path(tempfile.mkdtemp(prefix="geoseg-bench-peer-"))
    try:
        results = _bench(args, Path(venv["path"]), work)
        results["venv"] = venv
        _print(results)
    finally:
        if args.keep:
            print(f"\nkept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")


def _plan(bundle: Path, work: Path, openvino: bool) -> dict[str, dict[str, Any]]:
    """The geoseg rows: label, the bundle predicted, predict's options (those of the bare forward too)."""
    cpu: dict[str, Any] = {"device": "cpu"}
    rows: dict[str, dict[str, Any]] = {
        "pt_fp32": {"label": "geoseg PyTorch fp32", "bundle": bundle, "options": {**cpu, "precision": "fp32"}},
        "pt_auto": {"label": "geoseg defaults (PyTorch auto)", "bundle": bundle, "options": dict(cpu)},
        "pt_overlap": {"label": f"geoseg --overlap {CHIP // 2}", "bundle": bundle,
                       "options": {**cpu, "overlap": CHIP // 2}},
    }
    for backend in ("onnxruntime",) + (("openvino",) if openvino else ()):
        tag = "onnx" if backend == "onnxruntime" else backend
        for precision in ("fp32", "int8"):
            rows[f"{tag}_{precision}"] = {"label": f"geoseg {'ONNX Runtime' if tag == 'onnx' else 'OpenVINO'} "
                                                   f"{precision}", "bundle": work / f"bundle-onnx-{precision}",
                                          "options": {**cpu, "precision": precision, "backend": backend}}
    for key, r in rows.items():
        r["out"] = work / "out" / key
        r["bare_fn"] = "child_bare_onnx" if "backend" in r["options"] else "child_bare"
    return rows


def _bench(args: argparse.Namespace, venv: Path, work: Path) -> dict:
    import bench_pipeline

    inputs = make_inputs(work, args.size, args.seed, args.train_seconds, args.model)
    scene, bundle, gi_model = Path(inputs["scene"]), Path(inputs["bundle"]), Path(inputs["gi_model"])
    if inputs["chip"] != CHIP:
        raise SystemExit(f"{bundle}: chips of {inputs['chip']} px; this benchmark compares {CHIP} px chips "
                         f"(geo-inference -ps {CHIP}); give a bundle with chip_size {CHIP}")
    print(f"network: {inputs['weights']}; TorchScript for geo-inference (raw input, the bundle's mean/std inside) "
          f"vs bundle: max |logit diff| {inputs['export_max_abs_diff']:.2g}", flush=True)
    openvino = not args.no_openvino and bench_pipeline._has("openvino")
    rows = _plan(bundle, work, openvino)
    exports: dict[str, dict[str, Any]] = {}
    for int8 in (False, True):
        folder = work / f"bundle-onnx-{'int8' if int8 else 'fp32'}"
        t0 = time.perf_counter()
        exports[folder.name] = run_child("child_export", str(bundle), str(scene), str(folder), int8)
        exports[folder.name]["export_s"] = time.perf_counter() - t0
        q = exports[folder.name].get("int8") or {}
        print(f"exported {folder.name} in {exports[folder.name]['export_s']:.0f} s"
              + (f": FAILED {exports[folder.name]['failed']}" if exports[folder.name].get("failed") else "")
              + (f" (int8 on {q['calibration_chips']} calibration chips: {100 * q['agreement']:.2f} % agreement "
                 f"with fp32, float32 kept: {q.get('float32', 'stem')})" if q else ""), flush=True)
    n_classes = len(inputs["class_ids"])
    gi: dict[str, Any] = {"label": f"geo-inference ({CHIP}, 50 %)", "seconds": [], "peak_mb": []}
    for r in rows.values():
        r["runs"], r["bares"] = [], []
    for rep in range(args.repeats):
        for r in rows.values():
            a = (str(scene), str(r["bundle"]))
            run = run_child("child_predict", *a, str(r["out"]), r["options"])
            why = run.get("refused") or run.get("failed")
            bare = {"seconds": None} if why else run_child(r["bare_fn"], *a, r["options"])  # the same chips
            r["bares"].append(bare)
            r["runs"].append(run)
            print(f"[{rep + 1}/{args.repeats}] {r['label']}: "
                  + (f"{'refused' if run.get('refused') else 'failed'}: {why}" if why else
                     f"process {run['process_s']:.1f} s (predict {run['seconds']:.1f} s, bare forward "
                     f"{bare['seconds']:.1f} s), peak {run['peak_memory_mb']:.0f} MB, {run['precision']}, "
                     f"batch {run['batch_size']}, {run['chips']} chips"
                     + (" [torch loaded]" if run.get("torch_loaded") and "backend" in r["options"] else "")),
                  flush=True)
        res, path = run_geo_inference(venv, scene, gi_model, work / "out" / "geo_inference", n_classes, CHIP)
        gi["seconds"].append(res["seconds"])
        gi["peak_mb"].append(res["peak_mb"])
        gi["output"] = path
        print(f"[{rep + 1}/{args.repeats}] {gi['label']}: {res['seconds']:.1f} s, peak {res['peak_mb']:.0f} MB",
              flush=True)

    # the checks read rasters: only now, after every measured process has been started from a small parent
    gi["grid"] = check_grid(scene, gi["output"])
    reference = rows["pt_fp32"]["runs"][0].get("classes")
    for r in rows.values():
        classes = r["runs"][0].get("classes")
        ok = [x for x in r["runs"] if not (x.get("refused") or x.get("failed"))]
        r["summary"] = {
            "refused": r["runs"][0].get("refused"), "failed": r["runs"][0].get("failed"),
            "process_s": min(x["process_s"] for x in ok) if ok else None,
            "predict_s": min(x["seconds"] for x in ok) if ok else None,
            "bare_s": min(b["seconds"] for b in r["bares"]) if ok and not any(b.get("failed") for b in r["bares"])
            else None,
            "peak_mb": max(x["peak_memory_mb"] for x in ok) if ok else None,
            "precision": r["runs"][0].get("precision"), "batch_size": r["runs"][0].get("batch_size"),
            "chips": r["runs"][0].get("chips"), "torch_loaded": r["runs"][0].get("torch_loaded"),
        }
        if classes and ok:
            r["grid"] = check_grid(scene, Path(classes))
            r["agreement_fp32_pytorch"] = bench_pipeline._agreement(classes, reference) if reference else None
            r["agreement_geo_inference"] = class_agreement(Path(classes), gi["output"], inputs["class_ids"])
        for k in ("bundle", "out"):
            r[k] = str(r[k])
    gi["output"] = str(gi["output"])
    return {
        "size": args.size, "repeats": args.repeats, "seed": args.seed, "chip": CHIP, "train_seconds": args.train_seconds,
        "inputs": inputs, "exports": exports, "rows": rows, "geo_inference": gi,
        "machine": {"platform": platform.platform(), "processor": _cpu_model(), "cpus": os.cpu_count(),
                    "python": sys.version.split()[0], "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA")},
        "note": "seconds: fastest of the repeats; peak: largest; the CPU may have been shared",
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _f(v: float | None, width: int, fmt: str) -> str:
    return f"{v:>{width}{fmt}}" if v is not None and v == v else f"{'-':>{width}}"


def _print(res: dict) -> None:
    gi, inputs = res["geo_inference"], res["inputs"]
    gi_s, gi_mb = min(gi["seconds"]), max(gi["peak_mb"])
    isa = res["machine"].get("onednn_max_cpu_isa")
    print(f"\n{res['machine']['processor']}, {res['machine']['cpus']} CPUs"
          + (f", oneDNN capped at {isa} (ONEDNN_MAX_CPU_ISA)" if isa else ""))
    print(f"{res['size']}x{res['size']} 3-band uint8 scene, {inputs['architecture']} {inputs['encoder']} "
          f"({inputs['weights']}), {len(inputs['class_ids'])} classes, {CHIP} px chips, CPU; geo-inference "
          f"{res['venv']['geo_inference']} (torch {res['venv']['torch']}), geoseg torch {inputs['torch']}")
    print(f"{'run':<32} {'wall s':>7} {'peak MB':>8} {'GI/this s':>9} {'GI/this MB':>10} {'predict s':>9} "
          f"{'bare s':>7} {'effic.':>6} {'agree fp32':>10} {'agree GI':>8}  grid")
    for r in res["rows"].values():
        s = r["summary"]
        why = s["refused"] or s["failed"]
        if why:
            print(f"{r['label']:<32} {'refused' if s['refused'] else 'failed'}: {why}")
            continue
        eff = s["predict_s"] / s["bare_s"] if s["bare_s"] else None
        agree = r.get("agreement_fp32_pytorch")
        agi = r.get("agreement_geo_inference", {}).get("agreement")
        grid = "pass" if r["grid"]["pass"] else "FAIL: " + ", ".join(k for k, ok in r["grid"]["checks"].items() if not ok)
        print(f"{r['label']:<32} {s['process_s']:>7.1f} {s['peak_mb']:>8.0f} {gi_s / s['process_s']:>9.2f} "
              f"{gi_mb / s['peak_mb']:>10.2f} {s['predict_s']:>9.1f} {_f(s['bare_s'], 7, '.1f')} {_f(eff, 6, '.2f')} "
              f"{_f(100 * agree if agree is not None else None, 9, '.2f')}% {_f(100 * agi if agi is not None else None, 7, '.2f')}%"
              f"  {grid}" + ("  [torch loaded]" if s["torch_loaded"] and "backend" in r["options"] else ""))
    grid = "pass" if gi["grid"]["pass"] else "FAIL"
    print(f"{gi['label']:<32} {gi_s:>7.1f} {gi_mb:>8.0f} {1:>9.2f} {1:>10.2f} {'-':>9} {'-':>7} {'-':>6} {'-':>10} "
          f"{'-':>8}  {grid}")
    print(f"wall s: the whole process (interpreter, imports, model, the run), fastest of {res['repeats']}; peak: "
          "largest ru_maxrss; GI/this: geo-inference's over this row's (above 1: geoseg faster or smaller);\n"
          "predict s: the run inside the process; bare s: the network alone on the same chips, same runtime, "
          "precision, batch and threads; effic.: predict s / bare s;\n"
          "agree fp32: arg max equal to geoseg PyTorch fp32's class map (nodata included); agree GI: equal to "
          "geo-inference's class (its index k = class_ids[k]) where both are valid;\n"
          f"timings are noisy on a shared CPU. TorchScript for geo-inference vs bundle: max |logit diff| "
          f"{inputs['export_max_abs_diff']:.2g}")


if __name__ == "__main__":
    main()
