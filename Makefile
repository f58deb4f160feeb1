# Two commands on a fresh machine: `make demo` (the whole pipeline end to end) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint docs install clean

# --no-compile: byte-compiling all of torch at install time took ~20 s of the demo's first minute;
# Python compiles the modules it imports on first use instead.
$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-compile -e ".[test,serve,track]"
	touch $@

install: $(VENV)/.installed

# ruff's rules and format (pyproject.toml), checked before the tests in CI.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# Offline by default (CLIP weights from the local cache only; without them the demo says so and runs
# with random weights, every output marked not meaningful). `make demo ONLINE=1` may download them.
demo: $(VENV)/.installed
	$(PY) pipeline.py demo $(if $(ONLINE),--online,)

# The documentation site into site/, offline; --strict turns a broken link, anchor or page into an error.
docs: $(VENV)/.installed
	$(PY) -m pip install -q --no-compile -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) demo_out site
