# Every target sets up what it needs from nothing: a .venv at the repo root
# (torch pinned; on CPU machines pip finds the local CPU build; the test extra
# brings CoreCLR, the dotnetcore2 wheel), and Mono for the .NET host build
# when no .NET SDK is present. The host runs on both Mono and CoreCLR.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
HOST := dotnet_host_sample
export PYTHONUNBUFFERED := 1

.PHONY: setup test demo bench soak host mono clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test,bench,cluster]"
	touch $@

test: setup host
	EMBEDDED_WORKER_REQUIRE_DOTNET=1 $(PY) -m pytest -q

demo: setup
	@if command -v dotnet >/dev/null && dotnet --list-sdks 2>/dev/null | grep -q .; then \
	  EMBEDDED_WORKER_VENV=$(CURDIR)/$(VENV) dotnet run --project $(HOST)/app -- --out demo_output; \
	else \
	  $(MAKE) --no-print-directory host || exit 1; \
	  if $(HOST)/run.sh --runtime coreclr --probe >/dev/null 2>&1; then runtime=coreclr; else runtime=mono; fi; \
	  echo "running the host on $$runtime"; \
	  $(HOST)/run.sh --runtime $$runtime --out demo_output; \
	fi
	$(PY) -m embedded_worker demo --out demo_output/prompts

bench: setup host
	$(PY) -m benchmarks.run

# The .NET host: built with Mono's mcs here; Mono is installed when missing and we are root.
host: setup mono
	$(HOST)/build.sh

mono:
	@command -v mcs >/dev/null && command -v mono >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Mono (mono-devel) for the .NET host"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mono-devel >/dev/null; \
	  else \
	    echo "The .NET host needs Mono: apt-get install -y mono-devel (as root), or a .NET SDK: dotnet run --project $(HOST)"; \
	    exit 1; \
	  fi; }

# The long load test, the control storms (40 rounds, beside a CPU-heavy thread or process), then the
# leak-then-shutdown host ten times over, on Mono and on CoreCLR.
soak: setup host
	$(PY) -m pytest -q -s -m soak -p no:cacheprovider tests/test_soak.py tests/test_concurrency.py tests/test_control_storm.py tests/test_cluster.py
	EMBEDDED_WORKER_REQUIRE_DOTNET=1 $(PY) -m pytest -q -m soak -p no:cacheprovider tests/test_dotnet_host.py -k leak

clean:
	rm -rf $(VENV) demo_output $(HOST)/bin $(HOST)/obj
