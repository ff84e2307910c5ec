# The two commands a new user needs: `make test` and `make demo` (the paper's experiment,
# `make reproduce`, arrives with its issue).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.s4bt-installed

.PHONY: test lint demo bench install clean

install: $(STAMP)

# torch==2.13.0 first: on our machines it is a local CPU wheel; an unpinned torch pulls CUDA.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check s4bt_hf tests bench examples

test: lint
	HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 $(PY) -m pytest -q

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) examples/demo.py

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/bench_model.py

clean:
	rm -rf $(VENV) .pytest_cache
