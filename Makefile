# The two commands of the README's quick start: `make demo` and `make test`.
# Both create .venv on first use: CPU torch (torch==2.13.0), then bpo with its dev tools.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-fast install clean

demo: $(VENV)/.installed
	$(BIN)/bpo demo --out runs/demo

# Both tiers: the fast unit tests and the slower end-to-end ones (marked `slow`), plus ruff and
# the import layers (pyproject.toml's [tool.importlinter]).
test: $(VENV)/.installed
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/pytest -m "slow or not slow"

test-fast: $(VENV)/.installed
	$(BIN)/pytest

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# CPU torch first, so bpo's `torch>=2.4` is already met and no CUDA build is downloaded.
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

clean:
	rm -rf $(VENV) runs
