"""Build csrc/'s CUDA extensions in place, one process per op, all at once (the GPU check's
``csrc`` stage; also for a developer after editing a kernel).

``pip install -e .`` builds the extensions one after another, and each op's ``*_api.cpp``
(torch's headers) takes most of its time: 111 s for the three ops on the H200 machine
(2026-11-29). Here every op builds in its own ``setup.py build_ext --inplace`` process
(``MMCAP_CUDA_OPS``, its own build folder; ninja inside each, ``MAX_JOBS`` split between them),
and ``--arch native`` compiles device code for the GPU that is present only
(``MMCAP_CUDA_ARCHS``) instead of sm_80 + sm_90. The modules ``mmcap_<op>_cuda`` land in the
repository root, importable with it on ``PYTHONPATH`` (as the GPU check sets it).

    tools/build_kernels.py [--arch native|90|80,90] [--ops rmsnorm,geglu] [--fallback-pip]
                           [--dry-run]

Exit status 0 when every op built; otherwise 1, with each failed op's build output.
``--fallback-pip``: after a failure, build everything the old way (``pip install --no-deps
--no-build-isolation -e .``: one op after another; --no-deps keeps the machine's torch) and
exit with its status.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def discover_ops() -> list[str]:
    """The csrc/<op>/ folders with sources (setup.py builds the same set)."""
    return sorted(
        os.path.basename(os.path.dirname(d))
        for d in glob.glob(os.path.join(ROOT, "csrc", "*", ""))
        if glob.glob(os.path.join(d, "*.cu")) or glob.glob(os.path.join(d, "*.cpp"))
    )


def native_arch() -> str:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("build_kernels: --arch native needs a visible CUDA device")
    major, minor = torch.cuda.get_device_capability()
    return f"{major}{minor}"


def module_current(op: str) -> bool:
    """Whether a ``mmcap_<op>_cuda*.so`` in the repository root is at least as new as every file
    of csrc/<op>/ and csrc/common/ (a rebuild with nothing to do leaves it untouched)."""
    found = glob.glob(os.path.join(ROOT, f"mmcap_{op}_cuda*.so"))
    sources = glob.glob(os.path.join(ROOT, "csrc", op, "*"))
    sources += glob.glob(os.path.join(ROOT, "csrc", "common", "*"))
    newest = max((os.path.getmtime(f) for f in sources), default=0.0)
    return any(os.path.getmtime(f) >= newest for f in found)


def build_commands(ops: list[str], arch: str | None, cpus: int) -> list[tuple[str, list, dict]]:
    """(op, command, extra environment) per op."""
    jobs = max(1, cpus // max(1, len(ops)))
    out = []
    for op in ops:
        tmp = os.path.join("build", "kernels", op)
        cmd = [sys.executable, "setup.py", "-q", "build_ext", "--inplace", "--build-temp", tmp]
        env = {"MMCAP_CUDA_OPS": op, "MAX_JOBS": str(jobs)}
        if arch:
            env["MMCAP_CUDA_ARCHS"] = arch
        out.append((op, cmd, env))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default=None,
                        help="'native' (the visible GPU), or compute capabilities such as 90 or "
                        "80,90; default: csrc/nvcc_flags.txt's (sm_80 + sm_90)")  # fmt: skip
    parser.add_argument("--ops", default=None, help="comma-separated ops (default: all)")
    parser.add_argument("--fallback-pip", action="store_true",
                        help="on failure, build with pip install -e . instead")  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = parser.parse_args(argv)
    available = discover_ops()
    ops = args.ops.split(",") if args.ops else available
    unknown = sorted(set(ops) - set(available))
    if unknown:
        parser.error(f"--ops: no csrc/<op>/ sources for {unknown}; ops: {available}")
    if not ops:
        print("build_kernels: csrc/ holds no extension sources; nothing to build")
        return 0
    arch = native_arch() if args.arch == "native" else args.arch
    commands = build_commands(ops, arch, os.cpu_count() or 1)
    if args.dry_run:
        for op, cmd, env in commands:
            extra = " ".join(f"{k}={v}" for k, v in env.items())
            print(f"[{op}] {extra} {' '.join(cmd)}")
        return 0
    start = time.monotonic()
    procs = {}
    for op, cmd, env in commands:
        procs[op] = subprocess.Popen(
            cmd, cwd=ROOT, env={**os.environ, **env}, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
    failed = []
    for op, proc in procs.items():
        output, _ = proc.communicate()
        took = time.monotonic() - start
        if proc.returncode == 0 and not module_current(op):
            print(f"build_kernels: mmcap_{op}_cuda FAILED: setup.py exited 0 but built nothing "
                  f"(no CUDA toolkit or no CUDA torch?):\n{output}", flush=True)  # fmt: skip
            failed.append(op)
        elif proc.returncode == 0:
            print(f"build_kernels: mmcap_{op}_cuda built ({took:.0f} s since start)", flush=True)
        else:
            failed.append(op)
            print(f"build_kernels: mmcap_{op}_cuda FAILED (exit {proc.returncode}):\n{output}",
                  flush=True)  # fmt: skip
    total = time.monotonic() - start
    arch_note = f"sm_{arch.replace(',', ', sm_')}" if arch else "csrc/nvcc_flags.txt's archs"
    print(f"build_kernels: {len(ops) - len(failed)}/{len(ops)} ops in {total:.0f} s ({arch_note})")
    if failed and args.fallback_pip:
        print("build_kernels: falling back to pip install -e . (all ops, one by one)", flush=True)
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
               "-e", "."]  # fmt: skip
        return subprocess.run(cmd, cwd=ROOT, check=False).returncode
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
