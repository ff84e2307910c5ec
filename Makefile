# The two commands a new user needs: `make test` and `make reproduce` (the paper's experiment).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.s4bt-installed

.PHONY: test lint demo reproduce reproduce-compression-aware reproduce-strong bench install clean

install: $(STAMP)

# torch==2.13.0 first: on our machines it is a local CPU wheel; an unpinned torch pulls CUDA.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test,export]"
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check s4bt_hf tests bench examples

# One pytest worker per core (pytest-xdist; conftest keeps each on one thread), a module's tests on one
# worker so that its shared fixtures are built once; the slowest tests listed at the end.
test: lint
	HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 $(PY) -m pytest -q -n auto --dist loadfile --durations=15

# The paper's experiment on sMNIST (about 15 minutes on 2 CPU cores); results in runs/reproduce/.
reproduce: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/s4bt reproduce --task smnist --output runs/reproduce

# The same experiment plus the compression-aware arms (Hankel-regularised originals reduced without
# retraining, reduction during training); reuses the finished stages of `make reproduce`; about 50 more
# epochs of training (about 20 more minutes on a quiet 2-core machine; far longer on a shared one).
reproduce-compression-aware: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/s4bt reproduce --task smnist --output runs/reproduce --compression-aware

# The field's metric on strong originals (3 seeds of 4 x 64 x 64 modes, LAST and AIRE in the same run,
# shrink, the compression-aware arms with reduction during training at rank 8, the paper's arms): about
# 13-14 hours on 2 cores (estimated), resumable (docs/experiments.md, "Strong originals").
reproduce-strong: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/s4bt reproduce --task smnist --budget strong --output runs/strong-smnist \
		--compression-aware --in-training-ranks 8

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) examples/demo.py

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/bench_model.py

clean:
	rm -rf $(VENV) .pytest_cache
