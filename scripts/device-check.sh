#!/usr/bin/env bash
# Everything that wants the lent GPU machine (one NVIDIA GPU, 16 cores), in one call:
#   1. the GPU tests (scripts/gpu-check.sh: real NVML, a torch allocation seen through it);
#   2. issue 5's routing comparison on 16 workers (bench/routing.py);
#   3. issue 6's autoscaling sweep on 16 workers (bench/autoscale.py);
#   4. issue 4's proxy comparison with gateway workers on 16 cores (bench/proxy.py).
# DEVICE_STEPS picks among them (default: "gpu routing autoscale proxy"); PROXY_ARGS adds
# bench/proxy.py options (e.g. "--unshared --runs max,paced --paced-duration 10 --skip nginx").
# To A/B a change on the same host, unpack the earlier commit into the git-ignored .ab/
# (`mkdir -p .ab/base && git archive BASE | tar -x -C .ab/base`), carry ".ab" too, and add
# "--compare .ab/base" to PROXY_ARGS: every gateway then also runs from that tree.
# Results go to $OUT (default out/device): seven files — logs, the two markdown reports, and
# results.tar.gz with everything (JSON, plots); the raw outputs are written under $WORK first.
# Wheels the machine lacks (orjson, pytest-asyncio; vllm-router and its fastapi/uvicorn for step
# 4) travel in .whl/, and wrk and nginx (Debian binaries, plus wrk's libluajit) in .devtools/
# (both git-ignored; `bash scripts/device-tools.sh [--python311]` fills them here; name them in
# the run's carry).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/device}
WORK=${WORK:-/tmp/kvpilot-device}
mkdir -p "$OUT" "$WORK/routing" "$WORK/autoscale"
ROUTING_BUDGET_S=${ROUTING_BUDGET_S:-280}
STEPS=" ${DEVICE_STEPS:-gpu routing autoscale proxy} "
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site PATH="/tmp/site/bin:$PATH"
fi
if [ -d .devtools ]; then
  export PATH="$PWD/.devtools/bin:$PATH" LD_LIBRARY_PATH="$PWD/.devtools/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 KVPILOT_SIM_CACHE=/tmp/kvpilot-cal.json
{ date -u; uname -m; nproc; python3 --version
  python3 -c 'import aiohttp, uvloop; print("aiohttp", aiohttp.__version__, "uvloop", uvloop.__version__)'
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } \
  | tee "$WORK/machine.txt"

if [[ $STEPS == *" gpu "* ]]; then
  echo "== 1. GPU tests"
  WHEELS_DIR=.whl timeout 120 bash scripts/gpu-check.sh >"$WORK/gpu.log" 2>&1
  echo "gpu-check rc=$?"; tail -3 "$WORK/gpu.log"
fi

if [[ $STEPS == *" routing "* ]]; then
  echo "== 2. routing (budget ${ROUTING_BUDGET_S}s)"
  timeout $((ROUTING_BUDGET_S + 60)) python3 bench/routing.py "$WORK/routing" --jobs "$(nproc)" \
    --budget-s "$ROUTING_BUDGET_S" >"$WORK/routing.log" 2>&1
  echo "routing rc=$?"; tail -3 "$WORK/routing.log"
fi

if [[ $STEPS == *" autoscale "* ]]; then
  echo "== 3. autoscaling"
  timeout "${AUTOSCALE_TIMEOUT_S:-240}" python3 bench/autoscale.py --seeds 1,2,3 --workers "$(nproc)" \
    --out "$WORK/autoscale" >"$WORK/autoscale.log" 2>&1
  echo "autoscale rc=$?"; tail -3 "$WORK/autoscale.log"
fi

if [[ $STEPS == *" proxy "* ]]; then
  # 16 cores: 4 wrk threads and 4 backend processes, so neither caps the proxies under test
  echo "== 4. proxy (gateway workers ${PROXY_WORKERS:=4,8})"
  py=python3 pypath=".:${PYTHONPATH:-}"
  if [ -f .devtools/py311.tar.xz ]; then
    # The Python the gateway image ships (3.11, python:3.11-slim; the machine's own is 3.12,
    # slower for the gateway), relocatable, with the gateway's packages in its site-packages.
    # It must not see the carried cp312 wheels, so vllm-router gets a launcher of its own.
    tar xJf .devtools/py311.tar.xz -C /tmp && py=/tmp/py311/bin/python3.11 pypath=.
    export LD_LIBRARY_PATH="/tmp/py311/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    mkdir -p /tmp/vr
    printf '#!/bin/sh\nPYTHONPATH=/tmp/site exec %s -m vllm_router.launch_router "$@"\n' \
      "$(command -v python3)" >/tmp/vr/vllm-router
    chmod +x /tmp/vr/vllm-router
  fi
  PATH="/tmp/vr:$PATH" PYTHONPATH="$pypath" timeout "${PROXY_TIMEOUT_S:-300}" "$py" bench/proxy.py \
    --duration "${PROXY_DURATION_S:-4}" \
    --repeat "${PROXY_REPEAT:-3}" --workers "$PROXY_WORKERS" --threads 4 --backend-processes 4 \
    --rate "${PROXY_RATE:-1000}" \
    --connections 64 ${PROXY_ARGS:-} >"$WORK/proxy.log" 2>&1
  echo "proxy rc=$?"; tail -12 "$WORK/proxy.log"
fi

cp "$WORK"/machine.txt "$WORK"/*.log "$OUT"/
cp "$WORK/routing/routing.md" "$OUT/routing-report.md" 2>/dev/null
cp "$WORK/autoscale/autoscale.md" "$OUT/autoscale-report.md" 2>/dev/null
tar czf "$OUT/results.tar.gz" -C "$WORK" .
