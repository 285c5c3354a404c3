#!/usr/bin/env bash
# The agent's GPU tests on a machine with an NVIDIA GPU: `bash scripts/gpu-check.sh`.
#
# Uses the first Python that already has what the tests need (the repo's .venv, or a system
# python3 with torch and pynvml, plus any wheels carried in .whl/); otherwise creates .venv and
# installs kvpilot[dev] and torch, bounded in time. Then runs `pytest -m gpu` on the agent's
# GPU tests. Exit status: pytest's (5, "no tests ran", counts as a failure here).
set -euo pipefail
cd "$(dirname "$0")/.."

need='import torch, pynvml, aiohttp, orjson, yaml, prometheus_client, pytest, pytest_asyncio'
py=""
for cand in .venv/bin/python python3; do
  if command -v "$cand" >/dev/null && PYTHONPATH=. "$cand" -c "$need" 2>/dev/null; then
    py=$cand; break
  fi
done

wheels=${WHEELS_DIR:-.whl}
if [ -z "$py" ] && ls "$wheels"/*.whl >/dev/null 2>&1; then
  # offline machine: wheels carried alongside the tree
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/kvpilot-site "$wheels"/*.whl
  export PYTHONPATH=/tmp/kvpilot-site
  PYTHONPATH=.:/tmp/kvpilot-site python3 -c "$need" && py=python3
fi

if [ -z "$py" ]; then
  echo "gpu-check: installing .venv (kvpilot[dev] + torch), at most 20 minutes" >&2
  test -x .venv/bin/python || python3 -m venv .venv
  timeout 1200 .venv/bin/pip install -q -e '.[dev]' torch
  py=.venv/bin/python
fi

nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv || true
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 600 "$py" -m pytest -q -m gpu -o addopts="" -p no:cacheprovider \
  tests/test_agent_gpu.py "$@"
