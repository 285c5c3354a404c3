#!/usr/bin/env bash
# Runs every benchmark under bench/ in turn; each prints its figures and writes bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/results
for b in bench/*.py; do
  echo "== $b"
  .venv/bin/python "$b"
done
