#!/usr/bin/env bash
# Installs the Debian tools the tests drive for real, only when they are missing.
set -euo pipefail
need=()
command -v promtool >/dev/null || need+=(prometheus)
command -v kubectl  >/dev/null || need+=(kubectl)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "missing Debian packages: ${need[*]} (run as root to install them)" >&2
    exit 0
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
