# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch first, pinned: this version is a CPU build on the machine's disk; an open range
# would download a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export MLFLOW_DISABLE_TELEMETRY ?= true
export DO_NOT_TRACK ?= true

.PHONY: install demo test lint format clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install  ## set-up + the whole pipeline on synthetic chest CT
	$(VENV)/bin/medml pipeline --config configs/demo.yaml

test: install  ## set-up + the test suite
	$(PY) -m pytest -q

lint: install  ## ruff, and the import contracts of the layers (pyproject [tool.importlinter])
	$(VENV)/bin/ruff check medml flows tests bench
	$(VENV)/bin/ruff format --check medml flows tests bench
	$(VENV)/bin/lint-imports

format: install
	$(VENV)/bin/ruff check --fix medml flows tests bench
	$(VENV)/bin/ruff format medml flows tests bench

clean:
	rm -rf workspace .pytest_cache
