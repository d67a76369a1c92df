"""Per-chip forward of an ONNX network in ONNX Runtime and in OpenVINO, fp32 and int8, interleaved in one process.

Takes an fp32 and an int8 export (``geoseg export --format onnx [--int8]``); runs one chip of the bundle's
size through each of the four (runtime, precision) pairs in turn, ``--repeats`` times, and prints the median
seconds per chip and the arg-max agreement of each with ONNX Runtime fp32 on that chip. Both runtimes get
the same threads (the CPU cores) and float32 inference precision.

    python benchmarks/bench_openvino.py --fp32 model-onnx/model.onnx --int8 model-onnx-int8/model.onnx
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fp32", type=Path, required=True)
    ap.add_argument("--int8", type=Path, required=True)
    ap.add_argument("--chip", type=int, default=512)
    ap.add_argument("--bands", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=4)
    args = ap.parse_args()
    import numpy as np
    import onnxruntime as ort
    import openvino as ov

    from geoseg.io.workers import cpu_cores

    threads = cpu_cores()
    x = np.random.default_rng(0).normal(size=(1, args.bands, args.chip, args.chip)).astype(np.float32)
    core = ov.Core()
    runs = {}
    for precision, path in (("fp32", args.fp32), ("int8", args.int8)):
        o = ort.SessionOptions()
        o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        o.intra_op_num_threads, o.inter_op_num_threads = threads, 1
        o.add_session_config_entry("session.intra_op.allow_spinning", "0")
        s = ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])
        runs[f"onnxruntime {precision}"] = lambda s=s: s.run(None, {s.get_inputs()[0].name: x})[0]
        req = core.compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                     "INFERENCE_PRECISION_HINT": "f32"}).create_infer_request()
        runs[f"openvino {precision}"] = lambda req=req: np.array(req.infer({0: x})[0])
    outs = {k: f() for k, f in runs.items()}  # first runs (compilation, arenas) off the clock
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for k, f in runs.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    ref = outs["onnxruntime fp32"]
    base = statistics.median(times["onnxruntime fp32"])
    print(f"{'runtime / precision':<20} {'s/chip':>7} {'speed vs ORT fp32':>17} {'agree ORT fp32':>14}")
    for k in runs:
        med = statistics.median(times[k])
        agree = float((outs[k].argmax(1) == ref.argmax(1)).mean())
        print(f"{k:<20} {med:>7.3f} {base / med:>16.2f}x {100 * agree:>13.2f}%")


if __name__ == "__main__":
    main()
