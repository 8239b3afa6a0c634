"""Count the host synchronisations a piece of code would make on CUDA, on a CPU machine.

On CUDA a tensor read by the host (``.item()``, ``.tolist()``, ``bool(t)``, ``.cpu()``, a
data-dependent shape such as ``nonzero``) blocks the host until the GPU has run every queued
kernel; so does a blocking host->device copy of a value the host made
(``torch.tensor(x, device=...)``: PyTorch waits on the stream after a copy without
``non_blocking``), and ``torch.tensor([t1, t2, ...])`` of device tensors reads each of them
(one count per tensor read). On CPU none of them costs anything, but the calls are the same, so
:class:`HostSyncCounter` (a ``TorchFunctionMode``) records each of them with the line that made
it and whose it is: the innermost ``mmcap`` or ``megatron`` frame of the call stack (the loss
function megatron-core's schedule calls is mmcap's; the found-inf / grad-norm reads inside
megatron-core's optimizer are megatron's).

What it cannot see on CPU: which tensors would live on the host. Code under the counter must
therefore do its host-side work on numpy (``Tensor.numpy()`` raises on a CUDA tensor, so it is
never a hidden sync and is not counted) or outside the counted region; ``.to()`` counts only
when it targets the CPU without ``non_blocking``.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import sys

import torch
from torch.overrides import TorchFunctionMode

# Tensor methods / torch functions whose result the host reads (one sync each on CUDA).
_READS = {
    "item", "tolist", "cpu", "__bool__", "__float__", "__int__", "__index__", "__complex__",
    "__format__", "is_nonzero", "equal", "allclose",
}
# Data-dependent output shapes: the host needs the size before it can allocate.
_SHAPES = {"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive"}
_CREATE = {"tensor", "as_tensor"}  # host value -> device tensor, blocking when a device is named

_OWNERS = ("mmcap", "megatron.core")
_THIS = os.path.abspath(__file__)


@dataclasses.dataclass(frozen=True)
class Sync:
    """One counted call: ``kind`` (the function), ``owner`` ("mmcap", "megatron.core" or
    "other") and ``site`` ("path:line" of the owner's innermost frame)."""

    kind: str
    owner: str
    site: str


def _is_cpu(device) -> bool:
    return device is not None and torch.device(device).type == "cpu"


def _to_target(args, kwargs):
    if "device" in kwargs:
        return kwargs["device"]
    for a in args[1:]:
        if isinstance(a, (str, torch.device)):
            return a
    return None


def _tensors_in(data) -> int:
    """Number of tensors inside (nested) list / tuple ``data``."""
    if isinstance(data, (list, tuple)):
        return sum(1 if isinstance(x, torch.Tensor) else _tensors_in(x) for x in data)
    return 0


def _bool_index(args) -> bool:
    idx = args[1] if len(args) > 1 else None
    items = idx if isinstance(idx, tuple) else (idx,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _counts(name: str, args, kwargs) -> int:
    """How many host reads the call makes (0: none)."""
    if name in _READS or name in _SHAPES:
        return 1
    if name == "to":
        return int(_is_cpu(_to_target(args, kwargs)) and not kwargs.get("non_blocking", False))
    if name in _CREATE:
        # A named device makes a blocking copy; data holding device tensors (a list of 0-d
        # results, as megatron-core's local grad-norm fallback builds) is read element by element.
        held = _tensors_in(args[0] if args else None)
        return held or int(kwargs.get("device") is not None)
    if name in ("__getitem__", "__setitem__"):
        return int(_bool_index(args))
    if name == "repeat_interleave":
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        return int(isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None)
    return 0


def _roots() -> dict[str, str]:
    import importlib

    return {
        n: os.path.dirname(os.path.abspath(importlib.import_module(n).__file__)) for n in _OWNERS
    }


def _owner(frame, roots: dict[str, str]) -> tuple[str, str]:
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        # Skip this counter and other modes' forwarding frames (mmcap's CPU shim).
        if path != _THIS and frame.f_code.co_name != "__torch_function__":
            for owner, root in roots.items():
                if path.startswith(root + os.sep):
                    top = root
                    for _ in range(owner.count(".") + 1):  # from the top package's parent
                        top = os.path.dirname(top)
                    return owner, f"{os.path.relpath(path, top)}:{frame.f_lineno}"
        frame = frame.f_back
    return "other", "?"


class HostSyncCounter(TorchFunctionMode):
    """``with HostSyncCounter() as c: ...`` then ``c.syncs`` (every counted call, in order),
    :meth:`count` and :meth:`table`."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[Sync] = []
        self._roots = _roots()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        n = _counts(name, args, kwargs)
        if n:
            self.syncs.extend([Sync(name, *_owner(sys._getframe(1), self._roots))] * n)
        return func(*args, **kwargs)

    def count(self, owner: str | None = None) -> int:
        return sum(1 for s in self.syncs if owner is None or s.owner == owner)

    def table(self) -> str:
        """``count  owner  kind  site`` lines, most frequent first."""
        c = collections.Counter(self.syncs)
        return "\n".join(f"{n:3d}  {s.owner:13s} {s.kind:12s} {s.site}" for s, n in c.most_common())
