# Two entry points for a fresh machine with nothing but Python: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.phanes-installed
DEMO_DIR ?= demo-output

.PHONY: setup links demo lint test test-fast bench clean

setup: links

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1  # pinned pair; torchvision only for tests
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=strict
	touch $(STAMP)

# Strict editable install: a link tree of the package files (mypy follows it to `phanes_kernels`, the installed
# name of kernels/). A file added or removed needs the links made again; edits need nothing.
FILES := $(VENV)/.phanes-files
links: $(STAMP)
	@find phanes_cli kernels -type f -not -path '*/__pycache__/*' | sort > $(FILES).new
	@cmp -s $(FILES).new $(FILES) || { $(PY) -m pip install -q --no-deps --no-build-isolation -e . \
		--config-settings editable_mode=strict && mv $(FILES).new $(FILES); }

demo: links
	PYTHONUNBUFFERED=1 $(PY) -m phanes_cli.demo --out $(DEMO_DIR)

# ruff (style, imports, likely bugs), mypy (types of phanes_cli and kernels), as configured in pyproject.toml, and
# the import layering (tools/import_graph.py: no cycle, no upward import, every deferred import listed).
lint: links
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(PY) tools/import_graph.py

# Two workers, one test file each at a time (module fixtures stay in one process); README: the measured time.
test: links
	$(PY) -m pytest -q -n 2 --dist loadfile

test-fast: links
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow"

bench: links
	$(PY) benchmarks/preprocess_bench.py --volumes 100
	$(PY) benchmarks/screen_bench.py
	$(PY) benchmarks/scale_bench.py --volumes 100,1000,5000
	$(PY) benchmarks/kernels_bench.py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
