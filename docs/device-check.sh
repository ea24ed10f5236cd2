#!/usr/bin/env bash
# The GPU checks of issue 10, as one script for a lent CUDA machine (run from the project root).
# Here: `bash ../shared/device/wheels.sh` (diffusers and python-osc into .whl/), then a device call
# with carry [".whl"] and the command `bash docs/device-check.sh`; its results land in $OUT.
# It installs nothing else: the device image has torch with CUDA, triton, onnxruntime.
#  1. tests/test_engine_cuda.py: a real whole-frame capture replays bit for bit what the eager fp16
#     frame gives (every cfg_type, 1/2/4 steps, live changes, a guidance crossing), and
#     compile+cuda_graph stays close and compiles nothing after warm-up;
#  2. sdbridge bench on the sd-turbo architecture at 512², every acceleration side by side;
#  3. the same for sdxl-turbo at 512², fewer accelerations (its UNet is 3x the work).
# Each step has its own time limit so one slow step cannot eat the others.
set -uo pipefail
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
export SDBRIDGE_CACHE=${SDBRIDGE_CACHE:-/tmp/sdbridge-cache}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
python3 -c "import torch, diffusers; print(torch.__version__, torch.version.cuda, diffusers.__version__)" \
    > "$OUT/versions.txt" 2>&1

timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_engine_cuda.py \
    > "$OUT/test_engine_cuda.txt" 2>&1
echo "test_engine_cuda rc=$?" >> "$OUT/summary.txt"

timeout 240 python3 -m bridge.cli bench --device cuda --arch sd-turbo --steps 1 4 --cfg self \
    --acceleration none cuda_graph compile compile+cuda_graph --repeats 15 --warmup 3 --no-live \
    --cache-dir "$SDBRIDGE_CACHE" --json > "$OUT/bench-sd-turbo.json" 2> "$OUT/bench-sd-turbo.log"
echo "bench sd-turbo rc=$?" >> "$OUT/summary.txt"

timeout 120 python3 -m bridge.cli bench --device cuda --arch sdxl-turbo --steps 1 --cfg self \
    --acceleration none cuda_graph --repeats 9 --warmup 2 --no-live \
    --cache-dir "$SDBRIDGE_CACHE" --json > "$OUT/bench-sdxl-turbo.json" 2> "$OUT/bench-sdxl-turbo.log"
echo "bench sdxl-turbo rc=$?" >> "$OUT/summary.txt"
cat "$OUT/summary.txt"
