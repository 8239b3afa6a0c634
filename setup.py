"""mmcap package. CUDA extensions in csrc/<op>/ are built only when CUDA is available.

Set MMCAP_SKIP_CUDA_BUILD=1 to skip them (CPU machines, CI). Each csrc/<op>/ folder holds one
extension: ``*_api.cpp`` bindings + ``*.cu`` kernels, built as ``mmcap_<op>_cuda``; folders
without sources (csrc/common/: shared headers) are skipped.

Two switches for building fewer things (tools/build_kernels.py, which builds the ops
concurrently, sets them):

- ``MMCAP_CUDA_OPS=rmsnorm,geglu``: only these ops (default: every csrc/<op>/ with sources);
- ``MMCAP_CUDA_ARCHS=90`` (or ``80,90``): device code for these compute capabilities instead
  of csrc/nvcc_flags.txt's sm_80 + sm_90.
"""

import glob
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def nvcc_flags():
    with open(os.path.join(HERE, "csrc", "nvcc_flags.txt")) as f:
        flags = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    archs = os.environ.get("MMCAP_CUDA_ARCHS", "").replace(" ", "")
    if not archs:
        return flags
    if not all(a.isdigit() and len(a) in (2, 3) for a in archs.split(",")):
        raise SystemExit(f"MMCAP_CUDA_ARCHS={archs!r}: use compute capabilities like 90 or 80,90")
    kept = []
    it = iter(flags)
    for flag in it:
        if flag == "-gencode":
            next(it, None)  # drop the file's "-gencode arch=...,code=..." pairs
        else:
            kept.append(flag)
    for a in archs.split(","):
        kept += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    return kept


def op_sources():
    """{op: [sources relative to HERE]} of the csrc/<op>/ folders to build (MMCAP_CUDA_OPS)."""
    found = {}
    for op_dir in sorted(glob.glob(os.path.join(HERE, "csrc", "*", ""))):
        op = os.path.basename(os.path.dirname(op_dir))
        sources = sorted(
            glob.glob(os.path.join(op_dir, "*.cpp")) + glob.glob(os.path.join(op_dir, "*.cu"))
        )
        if sources:
            found[op] = [os.path.relpath(s, HERE) for s in sources]
    wanted = [o for o in os.environ.get("MMCAP_CUDA_OPS", "").replace(" ", "").split(",") if o]
    unknown = sorted(set(wanted) - set(found))
    if unknown:
        raise SystemExit(
            f"MMCAP_CUDA_OPS: no csrc/<op>/ sources for {unknown}; ops: {sorted(found)}"
        )
    return {o: found[o] for o in wanted} if wanted else found


def cuda_extensions():
    if os.environ.get("MMCAP_SKIP_CUDA_BUILD", "0") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if CUDA_HOME is None or torch.version.cuda is None:
        print("mmcap: no CUDA toolkit / CUDA torch found; skipping csrc/ extensions")
        return [], {}
    exts = []
    for op, sources in op_sources().items():
        exts.append(
            CUDAExtension(
                name=f"mmcap_{op}_cuda",
                sources=sources,
                # One flag list for this build and the CPU compile check
                # (tools/check_kernels_compile.py). No --use_fast_math: the soft-cap and
                # softmax need precise tanhf / expf to meet the tests' tolerances. No -std:
                # torch picks the C++ standard its headers need (c++20 for torch 2.13).
                extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags()},
            )
        )
    return exts, ({"build_ext": BuildExtension} if exts else {})


ext_modules, cmdclass = cuda_extensions()

setup(
    name="mmcap",
    version="0.1.0",
    description="Megatron-style training of multilingual image-captioning models "
    "(Florence-2 vision/encoder + Florence-2 or Gemma-2 decoders)",
    packages=find_packages(include=["mmcap", "mmcap.*"]),
    python_requires=">=3.10",
    install_requires=[
        # Ranges, not pins: GPU images (NGC) bring their own torch, which must not be replaced.
        "torch>=2.4",
        "megatron-core>=0.16.1",
        "psutil",
        "numpy",
        "sentencepiece",
        "safetensors",
        "transformers>=5.0",
        "pillow",
    ],
    extras_require={
        "te": ["transformer-engine[pytorch]>=2.0"],
        "flash": ["flash-attn>=2.6.3"],  # softcap + sliding window
        "dali": ["nvidia-dali-cuda120"],
        # apex is not on PyPI: build it from source (--cpp_ext --cuda_ext) if you want its
        # fused optimizers / gradient-accumulation fusion; mmcap runs without it.
        "apex": [],
        "dev": ["pytest", "ruff"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
