"""Compile every csrc/<op>/*.cu for sm_80 and sm_90 on a CPU machine (CI; KERNELS.md), then
build and load each op's torch binding against the CPU torch.

Uses the pip CUDA toolkit in the running interpreter's environment
(``pip install -r requirements-kernels.txt``; ``make check-kernels`` does it), the flags of
csrc/nvcc_flags.txt (the ones setup.py builds with) plus ptxas's spill warning as an error.
Every csrc/*/*.h is also compiled by the host compiler (the bindings include them).

The bindings stage (skip it with ``--no-bindings``) does for each op what the GPU machine's
build does, as far as a CPU torch allows: its ``*_api.cpp`` compiled against the installed
torch headers (warnings are errors), linked with the op's kernel objects from the first stage,
torch's libraries and the toolkit's cudart into ``mmcap_<op>_cuda``; every symbol the module
needs must come from those, from Python, or from ``libc10_cuda`` (the one CUDA library a CPU
torch lacks). The module is then imported (lazy binding: nothing of ``libc10_cuda`` is called)
and each function is called as ``mmcap/ops/`` calls it, with CPU tensors: it must accept the
arguments (pybind11 raises TypeError otherwise) and refuse the tensors with its own CUDA
check. Not covered: anything that runs on a GPU.

Exit status 0 when everything passed, 1 otherwise; each failure prints the tool's output.
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
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
# Register spills are build failures (KERNELS.md); -v prints registers / smem per kernel.
STRICT = ["-Xptxas", "-v,--warn-on-spills,--warning-as-error", "-Werror", "all-warnings"]
# What torch.utils.cpp_extension adds to every nvcc call of the real build (COMMON_NVCC_FLAGS,
# -std=c++20, position-independent host code for the shared module):
# no implicit half / bfloat16 conversions or operators, so the kernels must not rely on them.
TORCH_NVCC = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
    "-std=c++20",
    "--compiler-options",
    "-fPIC",
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


def run(cmd: list[str], what: str, log: list[str]) -> bool:
    """Run ``cmd``; append its one-line result (and its output on failure) to ``log``."""
    start = time.monotonic()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    took = time.monotonic() - start
    status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
    log.append(f"{what}: {status} in {took:.1f} s")
    if proc.returncode != 0:
        log.append(proc.stdout + proc.stderr)
    elif summary := resource_summary(proc.stdout + proc.stderr):
        log.append(f"  {summary}")
    return proc.returncode == 0


def run_all(jobs: list, workers: int) -> bool:
    """Run the ``(fn, *args)`` jobs (each ``fn(*args, log) -> bool``) on ``workers`` threads
    (they wait on compilers); print each job's log in the jobs' order. True if all passed."""
    def one(job):
        log: list[str] = []
        return job[0](*job[1:], log), log

    ok = True
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for passed, log in pool.map(one, jobs):
            print("\n".join(log), flush=True)
            ok &= passed
    return ok


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


# Each binding's functions, called with CPU tensors and the argument kinds mmcap/ops/ passes
# (mmcap/ops/{rmsnorm,geglu}.py, softcap_ce.py / softcap_ce_fwdgrad.py): ``t(*shape)`` float32,
# ``i(*shape)`` int64. A new op needs its line here (the check fails without one).
CALLS = {
    "geglu": ["forward(t(4, 8))", "backward(t(4, 4), t(4, 8))"],
    "rmsnorm": ["forward(t(4, 8), t(8), 1e-6)", "backward(t(4, 8), t(4, 8), t(8), t(4))"],
    "softcap_ce": [
        "tile_stats(t(4, 8), i(4), t(4), t(4), t(4), 0, 30.0)",
        "tile_grad(t(4, 8), t(4, 8), i(4), t(4), t(4), 0, 30.0)",
    ],
}
# Symbols a binding may leave to the GPU machine: libc10_cuda's (absent from a CPU torch) and the
# Python C API (the interpreter's).
LEFT_TO_GPU = ("c10::cuda::",)
PYTHON_API = ("Py", "_Py")


def _torch_cxx_flags(cuda_root: str, shim: str) -> list[str]:
    import torch
    from torch.utils.cpp_extension import include_paths  # imports torch: bindings stage only

    # The CPU torch wheel lacks this generated header (KERNELS.md); one line stands in for it.
    os.makedirs(os.path.join(shim, "c10", "cuda", "impl"), exist_ok=True)
    with open(os.path.join(shim, "c10", "cuda", "impl", "cuda_cmake_macros.h"), "w") as f:
        f.write("#define C10_CUDA_BUILD_SHARED_LIBS\n")
    incs = [f"-I{p}" for p in include_paths()] + [f"-I{shim}", f"-I{cuda_root}/include"]
    incs.append(f"-I{sysconfig.get_paths()['include']}")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    # c++20 and the defines torch.utils.cpp_extension builds with (torch 2.13's headers need it)
    return ["-std=c++20", "-Wall", "-Werror", "-Wno-unused-function", "-fPIC", *incs,
            "-DTORCH_API_INCLUDE_EXTENSION_H", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]  # fmt: skip


def _link_flags(cuda_root: str) -> list[str]:
    from torch.utils.cpp_extension import library_paths

    libs = [f"-L{p}" for p in library_paths()] + [f"-Wl,-rpath,{p}" for p in library_paths()]
    return [*libs, "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python",
            f"-L{cuda_root}/lib", "-l:libcudart.so.13", f"-Wl,-rpath,{cuda_root}/lib"]  # fmt: skip


def unexpected_undefined(ld_output: str) -> list[str]:
    """Symbols ld reports undefined (``-z defs``) that neither torch's CPU libraries, cudart nor
    the op's kernels define, other than those left to the GPU machine."""
    missing = set()
    for line in ld_output.splitlines():
        if "undefined reference to `" in line:
            missing.add(line.split("undefined reference to `", 1)[1].rsplit("'", 1)[0])
    return sorted(m for m in missing if not m.startswith(LEFT_TO_GPU + PYTHON_API))


def check_binding(
    op: str, src: str, kernel_objs: list[str], cuda_root: str, flags: list[str], out: str,
    log: list[str],
) -> bool:
    """Compile, link (twice: the module, then ``-z defs`` for the symbol audit) and probe."""
    cxx = shutil.which("c++") or "c++"
    name = f"mmcap_{op}_cuda"
    obj = os.path.join(out, f"{name}_api.o")
    so = os.path.join(out, name + sysconfig.get_config_var("EXT_SUFFIX"))
    rel = os.path.relpath(src, ROOT)
    if not run([cxx, *flags, "-O0", f"-DTORCH_EXTENSION_NAME={name}", "-c", src, "-o", obj],
               f"c++ {rel} (CPU torch headers)", log):  # fmt: skip
        return False
    link = [cxx, "-shared", obj, *kernel_objs, *_link_flags(cuda_root)]
    if not run([*link, "-o", so], f"link {name}", log):
        return False
    audit = subprocess.run([*link, "-Wl,-z,defs", "-o", so + ".defs"], capture_output=True,
                           text=True, check=False)  # fmt: skip
    if bad := unexpected_undefined(audit.stdout + audit.stderr):
        log.append(f"link {name}: FAILED: undefined outside torch / cudart / its kernels:")
        log.append("  " + "\n  ".join(bad))
        return False
    if op not in CALLS:
        log.append(f"probe {name}: FAILED: no CALLS entry in {os.path.relpath(__file__, ROOT)}")
        return False
    probe_cmd = [sys.executable, os.path.abspath(__file__), "--probe", op, so]
    return run(probe_cmd, f"import {name}", log)


def probe(op: str, so: str) -> int:
    """(In a child process.) Import the module lazily bound and call each function of CALLS."""
    import importlib.util

    import torch

    sys.setdlopenflags(os.RTLD_LAZY | os.RTLD_LOCAL)
    spec = importlib.util.spec_from_file_location(f"mmcap_{op}_cuda", so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    scope = {"t": lambda *s: torch.zeros(*s), "i": lambda *s: torch.zeros(*s, dtype=torch.long)}
    failures = 0
    for call in CALLS[op]:
        try:
            eval(f"m.{call}", {**scope, "m": module})  # noqa: S307 (our own table)
        except RuntimeError as e:
            if "must be a CUDA tensor" in str(e):
                print(f"  {call}: refused CPU tensors as expected")
                continue
            print(f"  {call}: unexpected RuntimeError: {e}")
        except Exception as e:  # TypeError: the binding does not take these arguments
            print(f"  {call}: {type(e).__name__}: {e}")
        else:
            print(f"  {call}: accepted CPU tensors (its CUDA check is missing)")
        failures += 1
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-bindings", action="store_true",
                        help="compile the kernels only (skip building and importing bindings)")
    parser.add_argument("--probe", nargs=2, metavar=("OP", "SO"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        return probe(*args.probe)
    cuda_root = toolkit_root()
    nvcc = os.path.join(cuda_root, "bin", "nvcc")
    sources = sorted(glob.glob(os.path.join(CSRC, "*", "*.cu")))
    if not sources:
        sys.exit(f"check_kernels_compile: no .cu files under {CSRC}")
    workers = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="mmcap_kernels_") as out:
        objs: dict[str, list[str]] = {}
        jobs = []
        for src in sources:
            rel = os.path.relpath(src, ROOT)
            obj = os.path.join(out, rel.replace(os.sep, "_") + ".o")
            cmd = [nvcc, *nvcc_flags(), *TORCH_NVCC, *STRICT, "-c", src, "-o", obj]
            jobs.append((run, cmd, f"nvcc {rel}"))
            objs.setdefault(os.path.basename(os.path.dirname(src)), []).append(obj)
        # The bindings are built by the host compiler and include each op's header: it must
        # not expose device-only code (~1 s per header).
        cxx = shutil.which("c++") or "c++"
        for hdr in sorted(glob.glob(os.path.join(CSRC, "*", "*.h"))):
            if os.path.basename(hdr) == "torch_api.h":  # torch side: the bindings stage
                continue
            cmd = [cxx, "-std=c++20", "-fsyntax-only", "-Wall", "-Werror", "-x", "c++",
                   f"-I{cuda_root}/include", "-include", hdr, os.devnull]  # fmt: skip
            jobs.append((run, cmd, f"c++ host header {os.path.relpath(hdr, ROOT)}"))
        ok = run_all(jobs, workers)
        if ok and not args.no_bindings:
            flags = _torch_cxx_flags(cuda_root, os.path.join(out, "shim"))
            bindings = sorted(glob.glob(os.path.join(CSRC, "*", "*_api.cpp")))
            ops = [os.path.basename(os.path.dirname(src)) for src in bindings]
            ok = run_all([(check_binding, op, src, objs.get(op, []), cuda_root, flags, out)
                          for op, src in zip(ops, bindings, strict=True)], workers)  # fmt: skip
    print("all kernels compiled" if ok else "kernel compile check FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
