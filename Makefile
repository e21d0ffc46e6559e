# Two commands on a fresh machine (see README):  make install  &&  make test
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test lint protos gpu-check

install:  ## system packages (as root), venv with the server + dev extras, the colour-kernel plugin, the Node example client
	sh scripts/system-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[server,dev]'
	$(BIN)/augsvc build-kernels
	if command -v npm >/dev/null 2>&1; then cd examples/node-client && npm ci --no-audit --no-fund; \
	else echo "npm not found: skipping examples/node-client (tests/test_node_client.py is skipped)"; fi

test: lint  ## ruff and the layer contracts, then pytest (exit code 5, "no tests collected", is reported, not hidden)
	$(BIN)/python -m pytest -q -ra; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; fi; exit $$rc

lint:  ## ruff, and import-linter's layer contracts (pyproject.toml)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

protos:  ## regenerate augsvc/wire/_proto from protos/
	$(BIN)/python scripts/gen_protos.py

gpu-check:  ## on a GPU host: pytest -m gpu, the CUDA kernel, augsvc bench --device gpu (docs/gpu.md)
	bash scripts/gpu_check.sh
