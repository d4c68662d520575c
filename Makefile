# The two commands in the README: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: demo test install install-test clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Stamp files make re-runs instant while still reinstalling when pyproject changes.
$(VENV)/.installed: pyproject.toml constraints.txt | $(PY)
	$(PIP) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# Train a small ViT on the built-in shapes data, then draw its attention maps.
demo: install
	rm -rf runs/demo
	$(VENV)/bin/vitlab train --config shapes --run.name demo
	$(VENV)/bin/vitlab visualize --checkpoint runs/demo --samples 6

# pytest's own exit status is kept: 5 ("no tests ran") fails the target.
test: install-test
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
