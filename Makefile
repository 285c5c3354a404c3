# Every target creates and fills .venv when it is missing; `make test` also installs the
# Debian tools the tests use (prometheus' promtool, kubectl) when they are missing.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test lint format bench debian-deps venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

debian-deps:
	bash scripts/debian-deps.sh

demo: venv
	$(VENV)/bin/kvpilot demo

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: venv debian-deps lint
	$(PY) -m pytest -q tests  # GPU tests skip cleanly without one (scripts/gpu-check.sh runs them)

bench: venv
	bash scripts/bench-all.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
