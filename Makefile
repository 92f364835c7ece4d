# The two quickstart commands: `make train` (the main job) and `make test`.
# Each creates .venv and installs everything the first time.
PYTHON ?= python3
VENV := .venv
READY := $(VENV)/.ready

.PHONY: train test benchmark cuda-ext

$(READY): requirements.txt requirements-cuda-headers.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -r requirements.txt
	$(VENV)/bin/python -m pip install -q --no-deps -r requirements-cuda-headers.txt
	EI_KERNELS_SKIP_CUDA_BUILD=1 $(VENV)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

train: $(READY)
	$(VENV)/bin/ei train

test: $(READY)
	$(VENV)/bin/python -m pytest

benchmark: $(READY)
	$(VENV)/bin/python -m pytest benchmarks/

cuda-ext: $(READY)
	PATH=$(abspath $(VENV))/bin:$$PATH bash scripts/build_cuda_ext.sh
