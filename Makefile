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

# SAM 2 (`sam2`, the reference of the sam2.1_hiera_* models) is published as source only, and its
# build needs torch: it is built against the torch the test extras pinned, without its CUDA extension.
$(VENV)/.test-installed: pyproject.toml Makefile | $(VENV)/bin/python
	$(PY) -m pip install -q -e ".[test,demo]"
	SAM2_BUILD_CUDA=0 $(PY) -m pip install -q --no-build-isolation "sam2==1.1.0" "hydra-core>=1.3.2" "iopath>=0.1.10"
	touch $@

# 2 CPU devices (data parallel over the 2 cores). glibc's hugetlb tunable keeps XLA:CPU's
# per-step scratch blocks over 64 MB in the process (sam_jax/host_memory.py): set to a huge page
# size the kernel offers, 1 GiB, it lets a thread's heap grow to 4 GiB; else 1 (transparent huge
# pages for those blocks). Ignored where the C library is not glibc.
HUGETLB := $(if $(wildcard /sys/kernel/mm/hugepages/hugepages-1048576kB),1073741824,1)
demo: $(VENV)/.demo-installed
	GLIBC_TUNABLES="glibc.malloc.hugetlb=$(HUGETLB)$${GLIBC_TUNABLES:+:$$GLIBC_TUNABLES}" \
	XLA_FLAGS="--xla_force_host_platform_device_count=2 $$XLA_FLAGS" $(PY) -m sam_jax.demo --out demo_out

# Lint (ruff, configured in pyproject.toml), then the suite on two pytest workers (pytest-xdist), one
# compiling while the other computes: 587 tests in 22-24 minutes on 2 cores of an AVX-512 EPYC (32-39
# minutes on an earlier CPU whose matrix products ran at 0.4x the rate). The tests compile unoptimized
# XLA:CPU code, except the two that train for hundreds of steps (tests/conftest.py). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test: $(VENV)/.test-installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal

# Side by side with the official package (needs torch + segment-anything: the test extras).
bench: $(VENV)/.test-installed
	$(PY) -m bench --model vit_b

clean:
	rm -rf $(VENV) demo_out .pytest_cache
