"""Compile every csrc/<op>/*.cu for sm_80 and sm_90 on a CPU machine (CI; KERNELS.md).

Uses the pip CUDA toolkit in the running interpreter's environment
(``pip install -r requirements-kernels.txt``; ``make check-kernels`` does it), the flags of
csrc/nvcc_flags.txt (the ones setup.py builds with) plus ptxas's spill warning as an error.
Stops at object files: nothing is linked or run. Every csrc/*/*.h is also compiled by the host
compiler (the bindings include them). ``--api`` also syntax-checks each
``*_api.cpp`` binding against the installed (CPU) torch headers (slow: ~1 min per file).

Exit status 0 when everything compiled, 1 otherwise; each failure prints nvcc's output.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
# Register spills are build failures (KERNELS.md); -v prints registers / smem per kernel.
STRICT = ["-Xptxas", "-v,--warn-on-spills,--warning-as-error", "-Werror", "all-warnings"]
# What torch.utils.cpp_extension adds to every nvcc call of the real build (COMMON_NVCC_FLAGS
# and -std=c++20):
# no implicit half / bfloat16 conversions or operators, so the kernels must not rely on them.
TORCH_NVCC = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
    "-std=c++20",
]


def toolkit_root() -> str:
    root = os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "cu13")
    if not os.path.exists(os.path.join(root, "bin", "nvcc")):
        sys.exit(
            f"check_kernels_compile: no nvcc under {root}; install the toolkit with "
            f"`{sys.executable} -m pip install -r requirements-kernels.txt`"
        )
    return root


def nvcc_flags() -> list[str]:
    with open(os.path.join(CSRC, "nvcc_flags.txt")) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def run(cmd: list[str], what: str) -> bool:
    start = time.monotonic()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    took = time.monotonic() - start
    status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
    print(f"{what}: {status} in {took:.1f} s", flush=True)
    if proc.returncode != 0:
        print(proc.stdout + proc.stderr, flush=True)
    elif summary := resource_summary(proc.stdout + proc.stderr):
        print(f"  {summary}", flush=True)
    return proc.returncode == 0


def resource_summary(ptxas_log: str) -> str:
    """Kernels and max registers per arch from ptxas -v ("Compiling entry function ... for
    'sm_90'" then "Used N registers")."""
    per_arch: dict[str, list[int]] = {}
    arch = None
    for line in ptxas_log.splitlines():
        if "Compiling entry function" in line:
            arch = line.rsplit("for ", 1)[-1].strip("'")
        elif "Used" in line and "registers" in line and arch:
            per_arch.setdefault(arch, []).append(int(line.split("Used")[1].split()[0]))
    return ", ".join(
        f"{a}: {len(r)} kernels, max {max(r)} registers" for a, r in sorted(per_arch.items())
    )


def api_syntax_cmd(src: str, cuda_root: str) -> list[str]:
    from torch.utils.cpp_extension import include_paths  # only with --api: imports torch

    shim = tempfile.mkdtemp(prefix="mmcap_shim_")
    # The CPU torch wheel lacks this generated header (KERNELS.md); one line stands in for it.
    os.makedirs(os.path.join(shim, "c10", "cuda", "impl"))
    with open(os.path.join(shim, "c10", "cuda", "impl", "cuda_cmake_macros.h"), "w") as f:
        f.write("#define C10_CUDA_BUILD_SHARED_LIBS\n")
    incs = [f"-I{p}" for p in include_paths()] + [f"-I{shim}", f"-I{cuda_root}/include"]
    incs.append(f"-I{sysconfig.get_paths()['include']}")
    return [
        # c++20 as torch.utils.cpp_extension builds (torch 2.13's headers need it)
        shutil.which("c++") or "c++", "-std=c++20", "-fsyntax-only", "-Wall", "-Werror",
        "-Wno-unused-function", "-DTORCH_EXTENSION_NAME=mmcap_check", *incs, src,
    ]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--api", action="store_true", help="also syntax-check *_api.cpp")
    args = parser.parse_args()
    cuda_root = toolkit_root()
    nvcc = os.path.join(cuda_root, "bin", "nvcc")
    sources = sorted(glob.glob(os.path.join(CSRC, "*", "*.cu")))
    if not sources:
        sys.exit(f"check_kernels_compile: no .cu files under {CSRC}")
    ok = True
    with tempfile.TemporaryDirectory(prefix="mmcap_kernels_") as out:
        for src in sources:
            rel = os.path.relpath(src, ROOT)
            obj = os.path.join(out, rel.replace(os.sep, "_") + ".o")
            ok &= run(
                [nvcc, *nvcc_flags(), *TORCH_NVCC, *STRICT, "-c", src, "-o", obj], f"nvcc {rel}"
            )
        # The bindings are built by the host compiler and include each op's header: it must
        # not expose device-only code (cheap stand-in for --api; ~1 s per header).
        cxx = shutil.which("c++") or "c++"
        for hdr in sorted(glob.glob(os.path.join(CSRC, "*", "*.h"))):
            if os.path.basename(hdr) == "torch_api.h":  # torch side: --api covers it
                continue
            cmd = [cxx, "-std=c++20", "-fsyntax-only", "-Wall", "-Werror", "-x", "c++",
                   f"-I{cuda_root}/include", "-include", hdr, os.devnull]  # fmt: skip
            ok &= run(cmd, f"c++ host header {os.path.relpath(hdr, ROOT)}")
        if args.api:
            for src in sorted(glob.glob(os.path.join(CSRC, "*", "*_api.cpp"))):
                ok &= run(api_syntax_cmd(src, cuda_root), f"c++ -fsyntax-only {src}")
    print("all kernels compiled" if ok else "kernel compile check FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
