# Two commands do all set-up on a fresh machine:
#   make test   create .venv, install the pinned dependencies, build the extension, run the tests
#   make demo   same set-up, then train the embedded default: torchrun --nproc_per_node 2 -m strive_engine.train
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
NPROC  ?= 2
STAMP  := $(VENV)/.installed

.PHONY: install test demo bench clean

$(STAMP): requirements.lock pyproject.toml setup.py CMakeLists.txt $(wildcard csrc/*)
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "error: Python >= 3.11 is needed (tomllib); set PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.lock
	MAX_JOBS=$(NPROC) $(BIN)/python -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	$(BIN)/torchrun --nproc_per_node $(NPROC) -m strive_engine.train

bench: $(STAMP)
	$(BIN)/python bench/throughput.py

clean:
	rm -rf $(VENV) build *.egg-info kernels/_C*.so
