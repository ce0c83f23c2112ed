# Each target does its own set-up on a fresh clone: a virtual environment in .venv
# with the package installed in editable mode (plus the extras the target needs).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.demo-installed: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e ".[demo]"
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e ".[test,demo]"
	touch $@

demo: $(VENV)/.demo-installed
	XLA_FLAGS="--xla_force_host_platform_device_count=2 $$XLA_FLAGS" $(PY) -m sam_jax.demo --out demo_out

test: $(VENV)/.test-installed
	$(PY) -m pytest -q

# Side by side with the official package (needs torch + segment-anything: the test extras).
bench: $(VENV)/.test-installed
	$(PY) -m bench --model vit_b

clean:
	rm -rf $(VENV) demo_out .pytest_cache
