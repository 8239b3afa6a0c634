# mmcap developer entry points. `make test` builds .venv from nothing (pinned, CPU) and runs
# the CPU test suite; GPU-only tests carry the `gpu` marker and skip themselves without CUDA.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mmcap-installed
PYTEST_ARGS ?=

.PHONY: test test-fast check-kernels demo venv clean

venv: $(STAMP)

$(STAMP): requirements-cpu.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-cpu.txt
	MMCAP_SKIP_CUDA_BUILD=1 $(PY) -m pip install -q --disable-pip-version-check --no-deps \
		--no-build-isolation -e .
	touch $(STAMP)

test: $(STAMP) check-kernels
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Compile every csrc/<op>/*.cu for sm_80 and sm_90 with the pip CUDA toolkit (no GPU needed;
# ~20 s on 2 cores, KERNELS.md). A kernel that does not compile, or spills, fails `make test`.
KERNEL_STAMP := $(VENV)/.mmcap-cuda-toolkit
$(KERNEL_STAMP): requirements-kernels.txt $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-kernels.txt
	touch $(KERNEL_STAMP)

check-kernels: $(KERNEL_STAMP)
	$(PY) tools/check_kernels_compile.py

# Everything but the tests marked slow.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# The main job end to end on the shipped demo data (CPU, 2 processes): data -> preprocess ->
# torchrun training at TP=2 with one resume -> CE per split -> Hugging Face export.
DEMO_OUT ?= demo_out
demo: $(STAMP)
	$(PY) tools/demo.py --out $(DEMO_OUT) --fresh

clean:
	rm -rf $(VENV) build *.egg-info
