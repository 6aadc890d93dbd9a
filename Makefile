# Two commands on a fresh machine:
#   make demo   train the tiny model and run the whole pipeline on ONNX Runtime CPU
#   make test   run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned so a CPU box takes the local 2.13.0 CPU wheel instead of several GB of CUDA wheels.
TORCH_SPEC ?= torch==2.13.0
RUN_DIR ?= runs/quickstart

.PHONY: venv demo test lint clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	# The stubs declare a dependency on the real tensorrt, which is not on PyPI.
	$(BIN)/pip install -q --no-deps tensorrt-stubs
	touch $@

demo: venv
	$(BIN)/mmgen quickstart --out $(RUN_DIR) --overwrite

test: venv
	$(BIN)/python -m pytest

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy mmgen_deploy

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
