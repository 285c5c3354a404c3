#!/usr/bin/env bash
# `make bench`: every benchmark under bench/, each bounded, results under out/bench/.
# Figures, commands and machines of record are in docs/benchmarks.md; the proxy benchmark wants
# Debian's wrk, nginx, valgrind and strace (installed here when missing, as root) and vllm-router from PyPI; the
# routing and autoscaling comparisons take hours on 2 cores, so this runs their quick forms:
# run `bench/routing.py OUT --jobs 16` and `bench/autoscale.py --seeds 1,2,3 --workers 16` (or
# scripts/device-check.sh) on a machine with 16 cores for the full ones.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=out/bench
mkdir -p "$OUT"
if [ "$(id -u)" = 0 ] && ! { command -v wrk && command -v valgrind && command -v strace; } >/dev/null; then
  apt-get install -y -qq wrk nginx valgrind strace >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq wrk nginx valgrind strace >/dev/null)
fi
$PY -c "import vllm_router" 2>/dev/null || $PY -m pip install -q vllm-router || true
failed=0
run() {
  echo "== $*"
  "$@" || { echo "!! failed: $*"; failed=1; }
}
run $PY bench/fidelity.py
run $PY bench/modelserver_overhead.py
run $PY bench/agent.py --seconds 20
run $PY bench/picker.py
run $PY bench/proxy.py --duration 5 --repeat 3
run $PY bench/hop_latency.py
run $PY bench/instructions.py
run $PY bench/instructions.py --prompt-chars 16384
run $PY bench/syscalls.py --workers 2 --rate 100 --connections 1 --backend-delay-ms 5
run $PY bench/gateway_workers.py
run $PY bench/peers.py
run $PY bench/sim_speed.py --duration 600
run $PY bench/sim_fidelity.py
run $PY bench/routing.py "$OUT/routing" --quick
run $PY bench/autoscale.py --seeds 1 --duration 1200 --out "$OUT/autoscale"
run $PY bench/autoscale_timeline.py --seed 1
exit $failed
