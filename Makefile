# Two commands on a fresh machine: `make demo` (the whole pipeline end to end) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test install clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

demo: $(VENV)/.installed
	$(PY) pipeline.py extract --dataset textile --cache-dir demo_out/cache --random-weights --limit 40

clean:
	rm -rf $(VENV) demo_out
