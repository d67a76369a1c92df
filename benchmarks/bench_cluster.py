"""The same mapping job on the local scheduler and on a dask.distributed LocalCluster of 1 and 2 workers.

A 4-scene job (synthetic 3-band uint8 scenes, ``--size`` px square) with a real CPU-bound network (a U-Net
on a resnet18 encoder at full depth, random weights, 6 classes, 256 px chips, 32 px overlap), class maps only
(``vector_format=None``), so that the model dominates. Each configuration gives the model one torch thread
per worker, so that the ratios measure the schedulers, not torch's own threading:

- ``threads``: ``predict_scenes(..., scheduler=None)`` in this process, after ``torch.set_num_threads(1)``;
- ``distributed`` 1 and 2: ``LocalCluster(n_workers=N, threads_per_worker=1, processes=True)`` and a
  ``Client`` passed as ``scheduler=client`` (geoseg's worker runtime sets torch's threads to the worker's
  ``nthreads``, so 1).

Every run has the same options (``workers=1``: one unit thread and one reader thread in each process that runs
the model) and writes into its own output folder. What each timing (wall seconds of one ``predict_scenes``
call, median of ``--repeats``) holds:

- all: planning (reading the scene headers, the bundle digest), every chip through the model, blending,
  staging the strips, writing the COGs and the job's mosaic VRT;
- ``threads`` also: reading the bundle and building the network in this process (printed apart as
  "model load");
- ``distributed`` also: shipping the units to the workers and the results back;
- not in any: imports, generating the inputs, starting the clusters (done first; both stay up, idle, while
  the others run)
  and each configuration's first-time costs. These are paid by a warm-up job
  of tiny scenes before the timings, repeated until every worker of a cluster has run a unit (checked with
  dask's task stream); a worker keeps its model between jobs, so the timed distributed runs load no model.

Repeats go round-robin over the configurations, so that a disturbance from elsewhere on the machine spreads
over all three. The class maps of every run are compared byte for byte.

dask starts its workers with ``MALLOC_TRIM_THRESHOLD_=65536`` (``distributed.nanny.pre-spawn-environ``): glibc
then hands freed tensor memory back to the system at once, and the next batch pays the page faults again
(measured on 2 cores: ~2.4x the minor faults, ~2.3x the system time, ~30 % slower per chip for this network
on one thread). geoseg's own ``--scheduler local:N`` clusters start their workers without it, and so does this
benchmark; ``--dask-malloc-trim`` keeps dask's setting (what a plain ``dask worker`` gets), to see that cost.

    python benchmarks/bench_cluster.py                          # 2048 px scenes, 2 repeats: ~7 min on 2 cores
    python benchmarks/bench_cluster.py --size 1024 --repeats 1  # ~2 min
    python benchmarks/bench_cluster.py --size 1024 --repeats 1 --dask-malloc-trim
    python benchmarks/bench_cluster.py --encoder resnet34 --chip 512 --workdir /tmp/bench-cluster
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

N_SCENES = 4
N_CLASSES = 6
WARM_SIZE = 512  # px, the warm-up job's scenes


def make_bundle(path: Path, encoder: str, chip: int, overlap: int) -> Path:
    """A U-Net bundle with random weights (no download), as ``tests/conftest.py``'s ``make_bundle`` does."""
    import torch

    from geoseg.model.bundle import save_bundle
    from geoseg.model.contract import ArchSpec, ClassInfo, Contract, InputSpec
    from geoseg.model.networks import build_network

    if path.exists():  # --workdir of an earlier run
        return path
    contract = Contract(
        name=f"bench-unet-{encoder}", model=ArchSpec(architecture="unet", encoder=encoder, params={}),
        input=InputSpec(bands=["red", "green", "blue"], mean=[120.0] * 3, std=[50.0] * 3),
        classes=[ClassInfo(id=i + 1, name=f"class {i + 1}", color=(40 * i % 256, 90, 200)) for i in range(N_CLASSES)],
        chip_size=chip, overlap=overlap,
    )
    torch.manual_seed(0)
    net = build_network(contract)  # encoder_weights=None: random initialisation
    net.eval()
    save_bundle(path, contract, net, overwrite=True)
    return path


def make_scenes(tmp: Path, size: int, n: int, prefix: str) -> list[Path]:
    from geoseg.learn.synthetic import make_scene

    scenes = []
    for i in range(n):
        p = tmp / f"{prefix}{size}-{i}.tif"
        if not p.exists():
            make_scene(p, tmp / f"{prefix}{size}-{i}.labels.tif", size, seed=1000 * i + size)
        scenes.append(p)
    return scenes


def run_job(scenes: list[Path], bundle: Path, out: Path, scheduler: Any) -> tuple[float, Any]:
    """Wall seconds of one ``predict_scenes`` call, and its result; exits if a scene is not made in ``out``."""
    from geoseg.predict.api import predict_scenes

    t0 = time.perf_counter()
    res = predict_scenes(scenes, bundle, out, scheduler=scheduler, vector_format=None, workers=1)
    seconds = time.perf_counter() - t0
    bad = [f"{s.scene}: {s.status} {s.error or ''}" for s in res.scenes if s.status != "done"]
    bad += [f"{s.scene}: class map {s.classes_path} is not in this run's folder" for s in res.scenes
            if s.status == "done" and Path(str(s.classes_path)).parent.resolve() != out.resolve()]
    bad += [f"{s.scene}: no class map written" for s in res.scenes
            if s.status == "done" and not (out / f"{Path(s.scene).stem}.classes.tif").is_file()]
    if bad:
        raise SystemExit(f"{out}: the job did not make every scene: {'; '.join(bad)}")
    return seconds, res


def warm(name: str, client: Any, scenes: list[Path], bundle: Path, tmp: Path, tries: int = 5) -> None:
    """Run the tiny job until every worker has run a unit (the local scheduler: once)."""
    if client is None:
        run_job(scenes, bundle, tmp / f"warm-{name}-0", None)
        return
    from distributed import get_task_stream

    workers = set(client.scheduler_info(n_workers=-1)["workers"])
    seen: set[str] = set()
    for k in range(tries):
        with get_task_stream(client) as ts:
            run_job(scenes, bundle, tmp / f"warm-{name}-{k}", client)
        seen |= {t["worker"] for t in ts.data if str(t["key"]).startswith("geoseg-unit")}
        if workers <= seen:
            return
    print(f"warning: {name}: {len(workers - seen)} worker(s) ran no warm-up unit in {tries} tries; "
          "their model load falls in the first timing", flush=True)


def class_maps(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.classes.tif"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=2048, help="scene width and height, px (default 2048)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of each configuration; the median is shown")
    ap.add_argument("--encoder", default="resnet18", help="U-Net encoder (default resnet18)")
    ap.add_argument("--chip", type=int, default=256, help="chip size of the model, px (default 256)")
    ap.add_argument("--overlap", type=int, default=32, help="chip overlap, px (default 32)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep (and reuse) the generated inputs here")
    ap.add_argument("--dask-malloc-trim", action="store_true",
                    help="start the workers with dask's MALLOC_TRIM_THRESHOLD_=65536, as `dask worker` does "
                         "(geoseg's local:N clusters leave it out; see the notes printed)")
    args = ap.parse_args()

    import dask
    import torch
    from distributed import Client, LocalCluster

    from geoseg.model.weights import load_model

    logging.getLogger("distributed").setLevel(logging.WARNING)  # no INFO lines from the schedulers' closing
    torch.set_num_threads(1)  # the local scheduler runs the model in this process: one torch thread
    # glibc reads it once, at start-up: LocalCluster also sets it in os.environ later, with no effect here
    own_trim = os.environ.get("MALLOC_TRIM_THRESHOLD_", "unset (glibc default)")
    worker_env = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    if not args.dask_malloc_trim:  # what geoseg's own `--scheduler local:N` clusters do
        worker_env.pop("MALLOC_TRIM_THRESHOLD_", None)
        dask.config.set({"distributed.nanny.pre-spawn-environ": worker_env})
    with tempfile.TemporaryDirectory(prefix="geoseg-bench-cluster-") as d:
        tmp = args.workdir or Path(d)
        tmp.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        bundle = make_bundle(tmp / f"unet-{args.encoder}-{args.chip}-{args.overlap}", args.encoder, args.chip,
                             args.overlap)
        scenes = make_scenes(tmp, args.size, N_SCENES, "scene")
        warm_scenes = make_scenes(tmp, max(WARM_SIZE, args.chip), 4, "warm")  # 2 a worker, 2 workers at most
        print(f"inputs: {N_SCENES} scenes {args.size}x{args.size}, U-Net {args.encoder}, chip {args.chip}, "
              f"overlap {args.overlap} ({time.perf_counter() - t0:.0f} s)", flush=True)
        t0 = time.perf_counter()
        load_model(bundle)
        model_load = time.perf_counter() - t0

        owned: list[Any] = []
        configs: list[tuple[str, str, int, Any]] = [("local1", "threads", 1, None)]
        try:
            for n in (1, 2):
                # ":0": the dashboard on a free port (None would still take 8787, perhaps someone else's)
                cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0")
                client = Client(cluster)
                owned += [client, cluster]
                configs.append((f"dist{n}", "distributed", n, client))
            for name, _, n, client in configs:
                t0 = time.perf_counter()
                warm(name, client, warm_scenes[: 2 * n] if client else warm_scenes[:1], bundle, tmp)
                print(f"warmed {name} ({time.perf_counter() - t0:.1f} s)", flush=True)
            times: dict[str, list[float]] = {name: [] for name, *_ in configs}
            model_s: dict[str, list[float]] = {name: [] for name, *_ in configs}
            maps: dict[str, dict[str, bytes]] = {}
            load0 = os.getloadavg()[0]
            for r in range(args.repeats):
                for name, _, _, client in configs:
                    out = tmp / f"out-{name}-{r}"
                    seconds, res = run_job(scenes, bundle, out, client)
                    times[name].append(seconds)
                    model_s[name].append(res.stage_seconds.get("model", 0.0))
                    maps[out.name] = class_maps(out)
                    print(f"{name} run {r + 1}: {seconds:.1f} s (scheduler {res.scheduler}, {res.workers} "
                          f"worker(s), model busy {model_s[name][-1]:.1f} s)", flush=True)
            load1 = os.getloadavg()[0]
        finally:
            for obj in owned:
                obj.close()

        mpix = N_SCENES * args.size * args.size / 1e6
        med = {name: statistics.median(v) for name, v in times.items()}
        print()
        print(f"{'run':>6} {'scheduler':>11} {'workers':>7} {'torch thr':>9} {'median s':>9} {'MPix/s':>7} "
              f"{'model s':>8}   runs s")
        for name, sched, n, _ in configs:
            runs = " ".join(f"{s:.1f}" for s in times[name])
            print(f"{name:>6} {sched:>11} {n:>7} {1:>9} {med[name]:>9.1f} {mpix / med[name]:>7.2f} "
                  f"{statistics.median(model_s[name]):>8.1f}   {runs}")
        print()
        print(f"speed-up, 2 workers over 1 (distributed): dist1 / dist2 = {med['dist1'] / med['dist2']:.2f}x")
        print(f"overhead of the distributed scheduler, 1 worker, against local threads with 1 torch thread: "
              f"dist1 / local1 - 1 = {100 * (med['dist1'] / med['local1'] - 1):+.1f} %")
        ref_name, ref = next(iter(maps.items()))
        diff = [f"{run}/{f}" for run, m in maps.items() for f in ref if m.get(f) != ref[f]]
        diff += [f"{run} has {len(m)} class maps, {ref_name} {len(ref)}" for run, m in maps.items()
                 if set(m) != set(ref)]
        verdict = "byte-identical" if not diff else f"DIFFER from {ref_name}: {', '.join(diff)}"
        print(f"class maps of all {len(maps)} runs ({len(ref)} each): {verdict}")
        print(f"notes: {mpix:.1f} MPix a run; 'model s' = busy seconds of the model stage summed over workers; "
              f"model load in this process (in every local1 timing only) {model_load:.2f} s; "
              f"1-min load average {load0:.1f} before the timings, {load1:.1f} after ({os.cpu_count()} cores)")
        trim = worker_env.get("MALLOC_TRIM_THRESHOLD_")
        print(f"workers' MALLOC_TRIM_THRESHOLD_: {trim if trim is not None else 'unset (glibc default)'}; "
              f"this process's: {own_trim}. dask sets it "
              "in every worker it spawns; glibc then unmaps freed tensor memory at once and torch pays the page "
              "faults again on every batch (compare with --dask-malloc-trim)")


if __name__ == "__main__":
    main()
