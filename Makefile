# mmcap developer entry points. `make test` builds .venv from nothing (pinned, CPU) and runs
# the CPU test suite; GPU-only tests carry the `gpu` marker and skip themselves without CUDA.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mmcap-installed
PYTEST_ARGS ?=

.PHONY: test test-fast check-kernels demo venv clean bench gpu-wheels gpu-check

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
# KERNELS.md), then build, link and import every binding against the CPU torch (~45 s on 2
# cores in all). A kernel or binding that does not compile or link, or spills, fails `make test`.
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

# Training throughput on synthetic data (CPU: the debug preset; shape only, see README).
bench: $(STAMP)
	$(PY) tools/benchmark.py --preset debug-gemma --steps 3 --compare hf

# Wheels the GPU machine lacks (shared/design/GPU.md), for Python 3.12 manylinux x86-64, into
# .whl/ (git-ignored; carried to the GPU machine): megatron-core and the small pure-Python
# packages the tests and the trainer import. Needs network (or a warm pip cache).
# transformers / tokenizers / regex: the pinned versions (the GPU machine's transformers 5.17
# lacks what mmcap.hf imports; measured 2026-11-29). Not huggingface_hub: 2.x needs httpx2 /
# httpcore2 / truststore, which that machine lacks; its hub 1.33 satisfies transformers 5.23
# (tests/hf and the benchmark's --compare hf pass with hub 1.33 + httpx here, 2026-11-30).
# liger-kernel / cut-cross-entropy: the kernels benchmark's baselines (need only triton).
GPU_WHEELS ?= megatron-core==0.16.1 pytest==9.2.0 pluggy==1.6.0 iniconfig==2.1.0 \
	pytest-timeout==2.4.0 pygments==2.19.2 packaging==25.0 pyyaml==6.0.3 psutil==7.2.2 \
	transformers==5.23.0 tokenizers==0.23.3 regex==2026.11.19 \
	liger-kernel==0.8.5 cut-cross-entropy==25.1.1
gpu-wheels:
	mkdir -p .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		--platform manylinux1_x86_64 -d .whl $(GPU_WHEELS)
	du -sh .whl

# The one-call GPU check (on the GPU machine: its own python3 with CUDA torch, not this venv):
# wheels from .whl/, csrc/ build, `pytest -m gpu`, training / attention / decode benchmarks,
# all output under $$OUT (or GPU_CHECK_OUT) within 10 minutes (the device tool's limit per call).
GPU_CHECK_OUT ?= $(if $(OUT),$(OUT),gpu_check_out)
gpu-check:
	bash tools/gpu_check.sh --out $(GPU_CHECK_OUT)

clean:
	rm -rf $(VENV) build *.egg-info
