#!/usr/bin/env bash
# The real-size speed table on a GPU machine that has torch but not diffusers (and no
# network). Run from the repository root; every argument goes to benchmarks.speed, e.g.
#
#   bash benchmarks/device_speed.sh --backends dreambooth,ipadapter,photomaker,instantid,pulid
#   bash benchmarks/device_speed.sh --backends dreambooth --modes compiled
#
# Missing pure-Python packages (diffusers, pluggy, ...) travel as wheels in .whl/
# (docs/performance.md says which). Results go to $OUT/speed (or ./speed-results),
# rewritten after every measurement, so a run stopped by a time limit keeps its numbers.
set -euo pipefail

if ! python3 -c "import diffusers" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
out="${OUT:-speed-results}/speed"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -m benchmarks.speed --size real --device cuda --steps 50 --repeats 2 --no-progress \
    --out "$out" "$@" 2>&1 | tee "$out/log.txt"
