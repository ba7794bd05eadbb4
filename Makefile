# The README's commands. Every target installs into .venv first (created if missing).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow lint bench install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) experiments/train.py

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy lightning_prune

bench: $(STAMP)
	$(PY) benchmarks/step_overhead.py
	$(PY) benchmarks/selection.py
	$(PY) benchmarks/export.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache lightning_logs
