#!/usr/bin/env bash
# The GPU checks of issue 10, as one script for a lent CUDA machine (run from the project root).
# Here: `bash ../shared/device/wheels.sh` (diffusers and python-osc into .whl/), then a device call
# with carry [".whl"] and the command `bash docs/device-check.sh`; its results land in $OUT.
# It installs nothing else: the device image has torch with CUDA, triton and onnxruntime.
#  1. tests/test_engine_cuda.py: a real whole-frame capture replays bit for bit what the eager fp16
#     frame gives (every cfg_type, 1/2/4 steps, live changes, a guidance crossing), and
#     compile+cuda_graph stays close and compiles nothing after warm-up;
#     with them the bench's CUDA-event timing and TensorRT's private stream (torch streams only);
#  2. sdbridge bench, every acceleration side by side, on each architecture in $ARCHES (512²).
# Each step has its own time limit, so one slow step cannot eat the others' time; together they
# stay under a device call's 600 s (inductor compiles each new UNet batch in about a minute there).
# PART=modes (a second call, when device time is left) measures instead the two inductor modes
# side by side, compile+cuda_graph under each on sd-turbo: max-autotune compiles for minutes.
# Its CPU path runs anywhere: DEVICE=cpu ARCHES=tiny PY=.venv/bin/python bash docs/device-check.sh
set -uo pipefail
OUT=${OUT:-/tmp/device-out}
DEVICE=${DEVICE:-cuda}
ARCHES=${ARCHES:-sd-turbo sdxl-turbo}
PY=${PY:-python3}
mkdir -p "$OUT"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
CACHE=${SDBRIDGE_CACHE:-/tmp/sdbridge-cache}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true; } > "$OUT/gpu.csv"
"$PY" -c "import torch, diffusers; print(torch.__version__, torch.version.cuda, diffusers.__version__)" \
    > "$OUT/versions.txt" 2>&1

if [ "${PART:-main}" = modes ]; then
    arch=${ARCHES%% *}; size=512; if [ "$arch" = tiny ]; then size=128; fi
    timeout -s INT -k 10 "${MODES_LIMIT_S:-540}" "$PY" -m bridge.cli bench --device "$DEVICE" --arch "$arch" --size "$size" \
        --steps 1 4 --cfg self --acceleration compile+cuda_graph --compile-mode default max-autotune-no-cudagraphs \
        --repeats 15 --warmup 3 --no-live --cache-dir "$CACHE" --json > "$OUT/bench-modes-$arch.json" 2> "$OUT/bench-modes-$arch.log"
    echo "bench modes $arch rc=$?" >> "$OUT/summary.txt"
    cat "$OUT/summary.txt"
    exit 0
fi

# pytest's cache (outside the working tree) keeps the tiny models the first run generates for
# the second. SIGINT at a time limit makes pytest print what it has; unbuffered, none is lost.
export PYTHONUNBUFFERED=1
# With the capture tests run the two other real-CUDA checks (seconds): the bench's event timing,
# and TensorRT's private stream forked from and joined back to torch's (torch only, no TensorRT).
PYTEST=("$PY" -m pytest -v -rA --durations=0 -o cache_dir=/tmp/pytest-cache tests/test_engine_cuda.py
    tests/test_bench_timing.py::test_real_cuda_events_time_a_call
    tests/test_accel_tensorrt.py::test_torch_streams_order_the_private_stream_between_torch_s_work)
timeout -s INT -k 10 "${TEST_LIMIT_S:-70}" "${PYTEST[@]}" -k "not compile" > "$OUT/test_engine_cuda.txt" 2>&1
echo "test_engine_cuda (capture) rc=$?" >> "$OUT/summary.txt"
timeout -s INT -k 10 "${COMPILE_TEST_LIMIT_S:-85}" "${PYTEST[@]}" -k compile > "$OUT/test_engine_cuda_compile.txt" 2>&1
echo "test_engine_cuda (compile) rc=$?" >> "$OUT/summary.txt"

ACCELS="none cuda_graph compile compile+cuda_graph cuda_graph+channels_last cuda_graph+cudnn_benchmark"
for arch in $ARCHES; do
    steps="1 4"; limit=${SD_LIMIT_S:-290}; accels=$ACCELS
    if [ "$arch" = sdxl-turbo ]; then steps="1"; limit=${SDXL_LIMIT_S:-95}; accels="none cuda_graph"; fi
    size=512; if [ "$arch" = tiny ]; then size=128; fi
    # shellcheck disable=SC2086  # the lists split into arguments
    timeout -s INT -k 10 "$limit" "$PY" -m bridge.cli bench --device "$DEVICE" --arch "$arch" --size "$size" --steps $steps \
        --cfg self --acceleration $accels --repeats 15 --warmup 3 --no-live --cache-dir "$CACHE" --json \
        > "$OUT/bench-$arch.json" 2> "$OUT/bench-$arch.log"
    echo "bench $arch rc=$?" >> "$OUT/summary.txt"
done
cat "$OUT/summary.txt"
