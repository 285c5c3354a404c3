#!/usr/bin/env bash
# Everything that wants the lent GPU machine (one NVIDIA GPU, 16 cores), in one call:
#   1. the GPU tests (scripts/gpu-check.sh: real NVML, a torch allocation seen through it);
#   2. issue 5's routing comparison on 16 workers (bench/routing.py);
#   3. issue 6's autoscaling sweep on 16 workers (bench/autoscale.py).
# Results go to $OUT (default out/device): seven files — logs, the two markdown reports, and
# results.tar.gz with everything (JSON, plots); the raw outputs are written under $WORK first.
# Wheels the machine lacks (orjson, pytest-asyncio) travel in .whl/ (git-ignored).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/device}
WORK=${WORK:-/tmp/kvpilot-device}
mkdir -p "$OUT" "$WORK/routing" "$WORK/autoscale"
ROUTING_BUDGET_S=${ROUTING_BUDGET_S:-280}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 KVPILOT_SIM_CACHE=/tmp/kvpilot-cal.json
{ date -u; uname -m; nproc; python3 --version; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } \
  | tee "$WORK/machine.txt"

echo "== 1. GPU tests"
WHEELS_DIR=.whl timeout 120 bash scripts/gpu-check.sh >"$WORK/gpu.log" 2>&1
echo "gpu-check rc=$?"; tail -3 "$WORK/gpu.log"

echo "== 2. routing (budget ${ROUTING_BUDGET_S}s)"
timeout $((ROUTING_BUDGET_S + 60)) python3 bench/routing.py "$WORK/routing" --jobs "$(nproc)" \
  --budget-s "$ROUTING_BUDGET_S" >"$WORK/routing.log" 2>&1
echo "routing rc=$?"; tail -3 "$WORK/routing.log"

echo "== 3. autoscaling"
timeout "${AUTOSCALE_TIMEOUT_S:-240}" python3 bench/autoscale.py --seeds 1,2,3 --workers "$(nproc)" --out "$WORK/autoscale" \
  >"$WORK/autoscale.log" 2>&1
echo "autoscale rc=$?"; tail -3 "$WORK/autoscale.log"

cp "$WORK"/machine.txt "$WORK"/*.log "$OUT"/
cp "$WORK/routing/routing.md" "$OUT/routing-report.md" 2>/dev/null
cp "$WORK/autoscale/autoscale.md" "$OUT/autoscale-report.md" 2>/dev/null
tar czf "$OUT/results.tar.gz" -C "$WORK" .
