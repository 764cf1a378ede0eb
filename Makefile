# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# A bare `torch` requirement can pull a multi-GB CUDA build; the pinned CPU build is installed first.
TORCH_PIN ?= torch==2.13.0

.PHONY: install demo test lint typecheck pytest bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip 2>/dev/null || true
	$(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/moeprof demo --out demo-out --force

lint: install
	$(VENV)/bin/ruff check moeprof tests benchmarks scripts

typecheck: install
	$(VENV)/bin/mypy

pytest: install
	$(VENV)/bin/pytest -q

test: lint typecheck pytest

bench: install
	$(PY) benchmarks/bench_analyze.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache .mypy_cache .ruff_cache
