# Every target sets up what it needs from nothing: a .venv at the repo root
# (torch pinned; on CPU machines pip finds the local CPU build), and Mono for
# the .NET host when no .NET runtime is present.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
HOST := dotnet_host_sample
export PYTHONUNBUFFERED := 1

.PHONY: setup test demo bench soak host clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test,bench]"
	touch $@

test: setup
	$(PY) -m pytest -q

demo: setup
	$(PY) -m embedded_worker demo --out demo_output

bench: setup
	$(PY) -m benchmarks.run

soak: setup
	$(PY) -m pytest -q -m soak -p no:cacheprovider tests

clean:
	rm -rf $(VENV) demo_output
