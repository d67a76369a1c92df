"""geoseg side by side with the peer geo-inference (NRCan), on one network and one scene, in one run.

What runs, each in its own process with its peak memory measured (``/usr/bin/time -v``, or the standard
library's ``resource.getrusage(RUSAGE_CHILDREN)`` in a small wrapper where that is absent):

a. ``geoseg predict SCENE --model BUNDLE --output-dir D --no-vector`` at geoseg's defaults (the bundle's
   512 px chips with 128 px overlap);
b. the same with ``--overlap 256``: stride 256, the fixed 50 % overlap geo-inference uses (stride = patch/2);
c. geo-inference's command line at its defaults, same scene, ``-ps 512`` and the same network as
   TorchScript, on the CPU (``geo_inference -i SCENE -m MODEL.pt -wd D -ps 512 -cls 6 -d cpu``).

geo-inference lives in its own virtual environment (``--venv``; made with ``python -m venv`` and
``pip install geo-inference==3.2.4`` on first use, reused afterwards), so its pins never touch ours. Only
if that clean install fails is the venv made again with ``--system-site-packages``.

Inputs, generated in a child process (the parent never imports torch, so it stays small):

- a synthetic 3-band uint8 scene from :func:`geoseg.learn.synthetic.make_scene` (EPSG:32633, 1 m, nodata 0,
  a nodata triangle in the top-left corner), ``--size`` pixels square;
- one network: smp U-Net resnet18, 6 classes, random weights (seed 0, ``encoder_weights=None``), saved as
  a geoseg bundle (512 px chips, 128 px overlap) and exported with :func:`geoseg.model.export.export` as
  TorchScript. geo-inference applies no normalisation: it hands each chip to the model as it is read
  (``torch.as_tensor`` of the uint8 array). So the TorchScript file geo-inference gets is the exported
  network wrapped in a scripted module that casts to float32 and applies the bundle's normalisation,
  ``(x - 0) * (1 / 255)``, the same float32 operations geoseg's reader does with the bundle's
  ``input.mean = [0, 0, 0]`` and ``input.std = [255, 255, 255]``. Both tools therefore feed the network
  identical inputs (the /255 scaling that models exported for geo-inference usually carry inside).

Checks printed per run: the output's CRS, transform, width and height equal the scene's (pass/fail);
class agreement between geoseg's class maps and geo-inference's over pixels both call valid.
geo-inference writes 0-based class indexes (the argmax of its blended logits, 255 = nodata); geoseg
writes the bundle's class ids 1..6, so geo-inference's ``k`` is compared with geoseg's ``k + 1``. The
two blend differently (geoseg: cosine-weighted mean of softmax probabilities; geo-inference: Hann-weighted
mean of logits), so agreement below 100 % near chip borders is expected, most of all with random weights.

    python benchmarks/bench_peer.py                          # 4096 x 4096 (about 12 min on 2 shared cores)
    python benchmarks/bench_peer.py --size 1024 --keep       # quick look; keep the scene and outputs
    python benchmarks/bench_peer.py --repeats 3 --json peer.json

With ``--repeats N`` each run is repeated N times (interleaved); the table shows the fastest wall time and
the largest peak. Timings on a shared machine are noisy: compare ratios within one run only.
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
CHIP, OVERLAP, N_CLASSES = 512, 128, 6
MEAN, STD = [0.0, 0.0, 0.0], [255.0, 255.0, 255.0]
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


def make_inputs(work: Path, size: int, seed: int) -> dict:
    """Generate the scene, the bundle and both exports in a child process; returns their paths.

    On Linux a process's ru_maxrss can start from the memory of the process it was forked from, so the
    parent, which starts the measured runs, never imports torch nor holds a scene.
    """
    code = (f"import sys; sys.path[:0] = [{str(HERE)!r}]; from bench_peer import _make_inputs; "
            f"_make_inputs({str(work)!r}, {size}, {seed})")
    res = subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _make_inputs(work_dir: str, size: int, seed: int) -> None:
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
    scene = make_scene(work / "scene.tif", work / "labels.tif", size, seed=seed).image
    print(f"generated a {size}x{size} scene in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    contract = Contract(
        name="unet-resnet18-random", model=ArchSpec(architecture="unet", encoder="resnet18"),
        input=InputSpec(bands=["red", "green", "blue"], mean=MEAN, std=STD),
        classes=[ClassInfo(id=i + 1, name=f"class {i + 1}", color=(40 * i % 256, 90, 200)) for i in range(N_CLASSES)],
        chip_size=CHIP, overlap=OVERLAP,
    )
    torch.manual_seed(seed)
    net = build_network(contract).eval()  # encoder_weights=None: random, seeded
    bundle = save_bundle(work / "bundle", contract, net, overwrite=True).path
    exported = export(bundle, "torchscript", work / "bundle-torchscript", overwrite=True)

    class RawToLogits(torch.nn.Module):
        """uint8 ``(N, C, H, W)`` as read -> logits, normalised exactly as geoseg's reader does."""

        def __init__(self, net: torch.nn.Module, mean: list[float], std: list[float]) -> None:
            super().__init__()
            self.net = net
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
            self.register_buffer("inv_std", (1.0 / torch.tensor(std, dtype=torch.float32)).view(1, -1, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net((x.to(torch.float32) - self.mean) * self.inv_std)  # type: ignore[operator]

    wrapped = torch.jit.script(RawToLogits(torch.jit.load(str(exported.model_path)), MEAN, STD))
    gi_model = work / "unet-resnet18-uint8.torchscript.pt"
    wrapped.save(str(gi_model))

    # the wrapped file on raw uint8 must give what the bundle gives on geoseg's normalised input
    raw = np.random.default_rng(seed).integers(1, 256, (1, 3, CHIP, CHIP), dtype=np.uint8)
    normalised = (raw.astype(np.float32) - np.float32(0.0)) * (np.float32(1.0) / np.float32(255.0))
    with torch.no_grad():
        ref = load_model(bundle).module(torch.from_numpy(normalised))
        got = torch.jit.load(str(gi_model))(torch.from_numpy(raw))
    diff = float((got - ref).abs().max())
    print(json.dumps({"scene": str(scene), "bundle": str(bundle), "gi_model": str(gi_model),
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


def run_geoseg(scene: Path, bundle: Path, out: Path, overlap: int | None) -> tuple[dict, Path]:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "geoseg.cli", "predict", str(scene), "--model", str(bundle),
           "--output-dir", str(out), "--no-vector", "--overwrite"]
    if overlap is not None:
        cmd += ["--overlap", str(overlap)]
    res = measured(cmd, out / "run.log")
    return res, out / f"{scene.stem}.classes.tif"


def run_geo_inference(venv: Path, scene: Path, model: Path, out: Path) -> tuple[dict, Path]:
    if out.exists():
        shutil.rmtree(out)  # its mask name carries a random suffix: start empty to find it
    out.mkdir(parents=True)
    exe = venv / ("Scripts/geo_inference.exe" if os.name == "nt" else "bin/geo_inference")
    cmd = [str(exe), "-i", str(scene), "-m", str(model), "-wd", str(out), "-ps", str(CHIP),
           "-cls", str(N_CLASSES), "-d", "cpu"]
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


def class_agreement(geoseg_map: Path, other_map: Path, offset: int = 1) -> dict:
    """Share of pixels valid in both where geoseg's class id equals the other map's value + ``offset``.

    ``offset`` is 1 for geo-inference (0-based indexes, 255 = nodata when the file names none) and 0 for
    another geoseg map.
    """
    import numpy as np
    import rasterio

    with rasterio.open(geoseg_map) as g, rasterio.open(other_map) as o:
        gs, other = g.read(1), o.read(1)
        g_nodata, o_nodata = g.nodata, o.nodata if o.nodata is not None else 255
    g_valid = gs != g_nodata if g_nodata is not None else np.ones(gs.shape, bool)
    o_valid = other != o_nodata
    both = g_valid & o_valid
    same = (gs.astype(np.int16) == other.astype(np.int16) + offset) & both
    n = int(both.sum())
    return {"agreement": float(same.sum()) / n if n else None, "pixels_compared": n,
            "validity_agreement": float((g_valid == o_valid).mean()),
            "classes_geoseg": np.unique(gs[g_valid]).tolist(),
            "classes_other_shifted": (np.unique(other[o_valid]).astype(int) + offset).tolist()}


# ------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=4096, help="scene width and height in pixels [4096]")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each command (interleaved) [1]")
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV,
                    help=f"geo-inference's virtual environment, made on first use [{DEFAULT_VENV}]")
    ap.add_argument("--gi-spec", default=GI_SPEC, help=f"what pip installs into a new venv [{GI_SPEC}]")
    ap.add_argument("--seed", type=int, default=0, help="seed of the scene and of the network's weights [0]")
    ap.add_argument("--keep", action="store_true", help="keep the scene, bundle, exports and outputs")
    ap.add_argument("--json", type=Path, default=None, help="write the results to this file")
    args = ap.parse_args()

    venv = ensure_venv(args.venv.resolve(), args.gi_spec)
    work = Path(tempfile.mkdtemp(prefix="geoseg-bench-peer-"))
    try:
        results = _bench(args, Path(venv["path"]), work)
    finally:
        if args.keep:
            print(f"\nkept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    results["venv"] = venv
    _print(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")


def _bench(args: argparse.Namespace, venv: Path, work: Path) -> dict:
    inputs = make_inputs(work, args.size, args.seed)
    scene, bundle, gi_model = Path(inputs["scene"]), Path(inputs["bundle"]), Path(inputs["gi_model"])
    print(f"TorchScript for geo-inference (uint8 in) vs bundle: max |logit diff| {inputs['export_max_abs_diff']:.2g}",
          flush=True)
    runs: dict[str, dict[str, Any]] = {
        "geoseg": {"label": f"geoseg defaults ({CHIP}/{OVERLAP})", "overlap": None},
        "geoseg_overlap256": {"label": f"geoseg --overlap {CHIP // 2} ({CHIP}/{CHIP // 2})", "overlap": CHIP // 2},
        "geo_inference": {"label": f"geo-inference ({CHIP}, 50 %)", "overlap": None},
    }
    for r in runs.values():
        r["seconds"], r["peak_mb"] = [], []
    for rep in range(args.repeats):
        for key, r in runs.items():
            out = work / "out" / key
            if key == "geo_inference":
                res, path = run_geo_inference(venv, scene, gi_model, out)
            else:
                res, path = run_geoseg(scene, bundle, out, r["overlap"])
            r["seconds"].append(res["seconds"])
            r["peak_mb"].append(res["peak_mb"])
            r["output"] = path
            print(f"[{rep + 1}/{args.repeats}] {r['label']}: {res['seconds']:.1f} s, peak {res['peak_mb']:.0f} MB",
                  flush=True)
    for r in runs.values():
        r["grid"] = check_grid(scene, r["output"])
    gi_out = runs["geo_inference"]["output"]
    agreement = {key: class_agreement(runs[key]["output"], gi_out) for key in ("geoseg", "geoseg_overlap256")}
    geoseg_pair = class_agreement(runs["geoseg"]["output"], runs["geoseg_overlap256"]["output"], offset=0)
    for r in runs.values():
        r["output"] = str(r["output"])
    return {
        "size": args.size, "repeats": args.repeats, "seed": args.seed, "chip": CHIP,
        "bundle_mean": MEAN, "bundle_std": STD, "inputs": inputs, "runs": runs,
        "agreement_with_geo_inference": agreement, "geoseg_defaults_vs_overlap256": geoseg_pair,
        "machine": {"platform": platform.platform(), "processor": _cpu_model(), "cpus": os.cpu_count(),
                    "python": sys.version.split()[0]},
        "note": "wall seconds: fastest of the repeats; peak: largest; the CPU may have been shared",
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _print(res: dict) -> None:
    runs = res["runs"]
    gi = runs["geo_inference"]
    gi_s, gi_mb = min(gi["seconds"]), max(gi["peak_mb"])
    print(f"\n{res['machine']['processor']}, {res['machine']['cpus']} CPUs")
    print(f"{res['size']}x{res['size']} 3-band uint8 scene, U-Net resnet18 (random weights), {N_CLASSES} classes,"
          f" CPU; geo-inference {res['venv']['geo_inference']} (torch {res['venv']['torch']}), "
          f"geoseg torch {res['inputs']['torch']}")
    print(f"{'run':<34} {'wall s':>8} {'peak MB':>8} {'GI/this s':>10} {'GI/this MB':>11}  grid (crs, transform, w, h)")
    for r in runs.values():
        s, mb = min(r["seconds"]), max(r["peak_mb"])
        failed = [k for k, ok in r["grid"]["checks"].items() if not ok]
        grid = "pass" if r["grid"]["pass"] else "FAIL: " + ", ".join(failed)
        print(f"{r['label']:<34} {s:>8.1f} {mb:>8.0f} {gi_s / s:>10.2f} {gi_mb / mb:>11.2f}  {grid}")
    print("ratios: geo-inference / this run (above 1: geoseg faster or smaller); wall = fastest of "
          f"{res['repeats']}, peak = largest (ru_maxrss); timings are noisy on a shared CPU")
    for key, a in res["agreement_with_geo_inference"].items():
        pct = f"{100 * a['agreement']:.3f} %" if a["agreement"] is not None else "n/a"
        print(f"class agreement, {runs[key]['label']} vs geo-inference (its index k = geoseg id k+1): {pct} of "
              f"{a['pixels_compared']} pixels valid in both; validity masks agree on "
              f"{100 * a['validity_agreement']:.2f} %")
    a = res["geoseg_defaults_vs_overlap256"]
    print(f"class agreement, geoseg overlap {OVERLAP} vs {CHIP // 2}: {100 * a['agreement']:.3f} %")


if __name__ == "__main__":
    main()
