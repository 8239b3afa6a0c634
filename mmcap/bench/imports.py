"""Which of mmcap's dependencies import on this machine, and their versions (the GPU check's
first stage): ``python -m mmcap.bench.imports``. Exit status 1 when a required one fails;
optional ones (GPU back-ends, benchmark baselines) are listed either way."""

from __future__ import annotations

import importlib
import sys
import warnings

REQUIRED = ["torch", "numpy", "megatron.core", "transformers", "huggingface_hub", "yaml",
            "PIL", "mmcap", "mmcap.hf", "mmcap.train"]  # fmt: skip
OPTIONAL = ["triton", "torchvision", "transformer_engine", "flash_attn", "apex", "nvidia.dali",
            "liger_kernel", "cut_cross_entropy", "sentencepiece", "pytest"]  # fmt: skip


def probe(name: str) -> tuple[bool, str]:
    """(imported, version or the error)."""
    try:
        with warnings.catch_warnings():  # megatron-core warns about every missing back-end
            warnings.simplefilter("ignore")
            mod = importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - any import failure is the answer
        return False, f"{type(e).__name__}: {e}".splitlines()[0][:160]
    version = getattr(mod, "__version__", None)
    if version is None and name == "megatron.core":
        version = getattr(importlib.import_module("megatron.core.package_info"), "__version__", "")
    return True, str(version or "")


def main() -> int:
    failed = []
    for group, names in (("required", REQUIRED), ("optional", OPTIONAL)):
        for name in names:
            ok, info = probe(name)
            print(f"{group:<9} {name:<20} {'ok' if ok else 'MISSING':<8} {info}")
            if not ok and group == "required":
                failed.append(name)
    if failed:
        print(f"imports: required modules failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
