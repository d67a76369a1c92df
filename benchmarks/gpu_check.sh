#!/usr/bin/env bash
# The GPU check of issue 25 as one command, for a lent machine with an NVIDIA GPU (an H200 here).
#
#   OUT=/some/folder bash benchmarks/gpu_check.sh
#
# Run from a folder made by benchmarks/gpu_pack.sh (geoseg, tests, these scripts, the wheels of what the GPU
# machine lacks, two trained bundles and their scenes); plain `bash benchmarks/gpu_check.sh` in a checkout
# with everything installed works too (data/ must then hold the bundles, see gpu_pack.sh).
# Each stage runs under `timeout` within one overall deadline (TOTAL seconds, default 420), so a stuck stage
# cannot take the rest with it. Everything lands in $OUT: gpu_check.log (this whole log), results.json (every
# figure, written as it is measured), smi.csv (nvidia-smi samples of every run), stages.txt.
# BENCH_DEVICE=cpu SIZE=2048 CPU_SIZE=1024 NO_WHEELS=1 rehearses the stages on a machine without a GPU
# (PY=python of an environment with the packages the wheels would bring). A shorter, targeted run: SKIP_ENV=1,
# PYTEST_NODES="...", AGREE_VARIANTS="cuda_fp32;cuda_bf16", SPEED_ONLY="label;label" (bench_gpu.py's
# labels, in that order), BARE_PLAN="fp32:32 bf16:32", CPU_NS="8", CPU_WARM=1 (cold and warm job per cluster).
set -u -o pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export OUT=${OUT:-/tmp/gpu-out} PYTHONUNBUFFERED=1 GPU_SMI_DIR=/tmp/gpu-smi
mkdir -p "$OUT" "$GPU_SMI_DIR"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
T0=$(date +%s)
TOTAL=${TOTAL:-420}
SIZE=${SIZE:-16384}
CPU_SIZE=${CPU_SIZE:-1536}
WORK=${WORK:-/tmp/gpuwork}
PY=${PY:-python3}

left() { echo $(( TOTAL - ($(date +%s) - T0) )); }
# stage NAME LIMIT RESERVE CMD...: run CMD for at most LIMIT s, and never into the RESERVE s kept for later stages
stage() {
    local name=$1 limit=$2 reserve=$3; shift 3
    local avail=$(( $(left) - reserve ))
    (( avail < limit )) && limit=$avail
    if (( limit < 10 )); then
        echo "=== $name: SKIPPED, $(left) s left"; echo "$name skipped" >> "$OUT/stages.txt"; return 0
    fi
    echo "=== $name: start at +$(( $(date +%s) - T0 )) s, limit $limit s"
    local t=$(date +%s)
    timeout -k 5 "$limit" "$@"
    local rc=$?
    echo "=== $name: rc $rc after $(( $(date +%s) - t )) s"
    echo "$name rc=$rc seconds=$(( $(date +%s) - t ))" >> "$OUT/stages.txt"
}

if [ -z "${NO_WHEELS:-}" ] && ls whl/*.whl >/dev/null 2>&1; then
    stage wheels 60 0 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site whl/*.whl
    export PYTHONPATH=$ROOT:/tmp/site
else
    export PYTHONPATH=$ROOT
fi
nvidia-smi || true
nproc; free -g | head -2
[ -z "${SKIP_ENV:-}" ] && stage env 45 320 $PY benchmarks/bench_gpu.py env

# correctness: the CUDA tests, the backend tests, the auto-batch probe, the overflow count without a sync
# shellcheck disable=SC2206
nodes=(${PYTEST_NODES:-tests/predict/test_predict.py::test_cuda_path_matches_the_cpu tests/predict/test_backends.py \
    tests/predict/test_hardware.py tests/predict/test_inference.py \
    tests/predict/test_numerics.py::test_logits_that_overflow_stay_a_distribution_and_are_reported})
stage pytest 100 260 $PY -m pytest -q -p no:cacheprovider -o addopts="" -rs "${nodes[@]}"
# shellcheck disable=SC2206
agree=(${AGREE_VARIANTS:+--agree-variants} ${AGREE_VARIANTS//;/ })
agree=("${agree[@]//_/ }")  # AGREE_VARIANTS="cuda_fp32;cuda_bf16"
stage agree 70 230 $PY benchmarks/bench_gpu.py agree --work "$WORK" --agree-batch 8 "${agree[@]}" \
    --demo-bundle data/demo-model --demo-scene data/demo_scene_1024.tif \
    --spacenet-bundle data/spacenet-model --spacenet-scene data/sample_geotiff.tif

# speed: the scenes and bundle made here, then the big scene through the GPU, the bare network, the CPU path
stage make 90 200 $PY benchmarks/bench_gpu.py make --work "$WORK" --size "$SIZE" --cpu-size "$CPU_SIZE"
budget=$(( $(left) - 150 )); (( budget > 160 )) && budget=160
only=()
if [ -n "${SPEED_ONLY:-}" ]; then IFS=';' read -r -a only <<< "$SPEED_ONLY"; only=(--only "${only[@]}"); fi
stage speed $(( budget + 50 )) 110 $PY benchmarks/bench_gpu.py speed --work "$WORK" --size "$SIZE" --budget "$budget" \
    "${only[@]}"
# shellcheck disable=SC2086
stage bare 45 70 $PY benchmarks/bench_gpu.py bare --work "$WORK" --budget 30 ${BARE_PLAN:+--bare-plan $BARE_PLAN}
budget=$(( $(left) - 25 )); (( budget > 90 )) && budget=90
# shellcheck disable=SC2086
stage cpu $(( budget + 25 )) 0 $PY benchmarks/bench_gpu.py cpu --work "$WORK" --cpu-size "$CPU_SIZE" --budget "$budget" \
    --ns ${CPU_NS:-1 2 4 8} ${CPU_WARM:+--warm}

for f in "$GPU_SMI_DIR"/*.csv; do [ -e "$f" ] && sed "s|^|$(basename "$f" .csv),|" "$f"; done > "$OUT/smi.csv"
$PY - <<'EOF' || true
import json, os
r = json.load(open(os.path.join(os.environ["OUT"], "results.json")))
print("\n==== summary")
for k, v in r.get("agree", {}).items():
    for lab in ("cuda fp32", "cuda fp32 no-tf32", "cuda bf16"):
        if lab in v:
            print(f"agree {k:<9} {lab:<18} {100 * v[lab]['identical_share']:.4f} % identical, "
                  f"max|dp| {v[lab]['max_abs_prob_diff']:.1e}")
for k, v in r.get("speed", {}).items():
    if "wall_s" in v:
        print(f"speed {k:<32} {v['wall_s']:6.1f} s {v['mpix_per_s']:6.1f} Mpix/s  busy {v['gpu_busy_of_model_span']}"
              f" smi {v.get('smi_util_mean')} %  batch {v['settings']['batch_size']} {v['settings']['precision']}"
              f"  stages {v['stage_seconds']}  thread {v['model_thread_seconds']}")
    else:
        print(f"speed {k:<32} {v}")
for k, v in r.get("bare", {}).items():
    print(f"bare  {k:<32} {v}")
for k, v in r.get("cpu", {}).items():
    if isinstance(v, dict) and "wall_s" in v:
        print(f"cpu   {k:<10} {v['wall_s']:6.1f} s {v['mpix_per_s']:6.2f} Mpix/s  {v['precision']} b{v['batch_size']}")
EOF
echo "=== done at +$(( $(date +%s) - T0 )) s"
sleep 1  # let tee write the last lines before the files are collected
