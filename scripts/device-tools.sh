#!/usr/bin/env bash
# Fill the two git-ignored folders that scripts/device-check.sh needs on the lent GPU machine,
# which has Python 3.12 with torch and aiohttp but cannot download anything:
#   .whl/       wheels for its Python 3.12: orjson and pytest-asyncio (GPU tests), uvloop (the
#               gateway's loop, as in its image), vllm-router
#               with its fastapi/uvicorn/pydantic stack (bench/proxy.py);
#   .devtools/  Debian's wrk and nginx with wrk's libluajit (bench/proxy.py), and, with
#               --python311, a relocatable Python 3.11 (the gateway image's minor version) with
#               the gateway's packages, as py311.tar.xz.
# Then: run `DEVICE_STEPS="gpu proxy" bash scripts/device-check.sh` there with carry
# [".whl", ".devtools"] (both count towards the 64 MiB the tree may weigh: ~26 + 2 MiB, +19 MiB
# with --python311).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
mkdir -p .whl .devtools/bin .devtools/lib
for d in /.whl/ /.devtools/; do
  grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >>.git/info/exclude
done

platforms=()
for n in 2_17 2_24 2_27 2_28 2_31 2_34; do platforms+=(--platform "manylinux_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl \
  orjson==3.13.0 pytest-asyncio==1.5.0 uvloop==0.23.0 \
  vllm-router==0.1.17 fastapi==0.165.0 uvicorn==0.54.0 setproctitle==1.3.8 \
  starlette==1.10.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5 typing_extensions==4.16.0 opentelemetry-api==1.45.2 \
  importlib-metadata==10.2.0 lazy-importer==0.1.0

if ! command -v wrk >/dev/null || ! [ -x /usr/sbin/nginx ]; then
  apt-get install -y -q wrk nginx-light >/dev/null
fi
cp "$(command -v wrk)" /usr/sbin/nginx .devtools/bin/
cp -L "$(ldconfig -p | awk '/libluajit-5.1.so.2 /{print $NF; exit}')" .devtools/lib/

if [ "${1:-}" = "--python311" ]; then
  # pyenv's build (no PGO/LTO, unlike the image's): for a like-for-like minor version only
  src=$("$PY" -c 'import sys; print(sys.base_prefix)')
  site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  tmp=$(mktemp -d)
  mkdir -p "$tmp/py311/bin" "$tmp/py311/lib/python3.11/site-packages"
  cp "$src/bin/python3.11" "$tmp/py311/bin/"
  cp "$src/lib/libpython3.11.so.1.0" "$tmp/py311/lib/"
  (cd "$src/lib" && tar cf - --exclude='__pycache__' --exclude=python3.11/test \
    --exclude=python3.11/site-packages --exclude=python3.11/idlelib --exclude=python3.11/tkinter \
    --exclude=python3.11/ensurepip --exclude=python3.11/lib2to3 --exclude='python3.11/config-*' \
    --exclude=python3.11/turtledemo --exclude='python3.11/lib-dynload/_test*' python3.11) |
    tar xf - -C "$tmp/py311/lib"
  for p in aiohttp aiohappyeyeballs aiosignal attr attrs frozenlist multidict propcache yarl \
    idna typing_extensions.py orjson xxhash prometheus_client yaml _yaml uvloop; do
    cp -r "$site/$p" "$tmp/py311/lib/python3.11/site-packages/"
  done
  find "$tmp/py311" -name __pycache__ -prune -exec rm -rf {} +
  tar cJf .devtools/py311.tar.xz -C "$tmp" py311
  rm -rf "$tmp"
fi
du -sh .whl .devtools
