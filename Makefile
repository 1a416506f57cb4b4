# hest2sge developer commands. `make demo` and `make test` are all a newcomer needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean docs

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch/torchvision are pinned here (not in pyproject) so the wheels on this machine's disk are used.
$(STAMP): $(PY) pyproject.toml
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/hest2sge demo --out demo_output

test: $(STAMP)
	$(PY) -m ruff check hest2sge tests benchmarks examples
	$(PY) -m pytest -q tests
	$(MAKE) docs

# The documentation site (mkdocs-material + mkdocstrings); --strict fails on broken links,
# missing references and docstring errors.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet

lint: $(STAMP)
	$(PY) -m ruff check hest2sge tests benchmarks examples

clean:
	rm -rf $(VENV) demo_output .pytest_cache site
