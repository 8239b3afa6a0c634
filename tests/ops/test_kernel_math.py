"""The kernels' scalar arithmetic on the host: the ``__host__ __device__`` helpers of the csrc/
headers (soft-cap and its derivative, gelu_tanh and its derivative, the online-softmax merge)
compiled by the host C++ compiler into a small library and compared with float64 torch.

KERNELS.md: CUDA C++ does not run on a CPU, so the math lives in header functions the host
can run; the kernels themselves are checked by the gpu-marked tests. Needs the pip CUDA
toolkit headers (``requirements-kernels.txt``, installed by ``make test``)."""

import ctypes
import math
import os
import shutil
import subprocess
import sysconfig

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CUDA_INCLUDE = os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "cu13", "include")
SHIM = r"""
#include "softcap_ce/softcap_ce.h"
#include "geglu/geglu.h"
extern "C" {
void softcap_many(const float* z, long n, float cap, float* c, float* d) {
  for (long i = 0; i < n; ++i) c[i] = mmcap::softcap_value(z[i], cap, &d[i]);
}
void gelu_many(const float* x, long n, float* y, float* d) {
  for (long i = 0; i < n; ++i) y[i] = mmcap::gelu_tanh(x[i], &d[i]);
}
void merge_many(const float* a, const float* b, long n, float* out) {  // pairs (m, s)
  for (long i = 0; i < n; ++i) {
    const mmcap::MaxSum r = mmcap::merge_max_sum({a[2 * i], a[2 * i + 1]}, {b[2 * i], b[2 * i + 1]});
    out[2 * i] = r.m;
    out[2 * i + 1] = r.s;
  }
}
}
"""


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    if not os.path.exists(os.path.join(CUDA_INCLUDE, "cuda_runtime.h")):
        pytest.skip("pip CUDA toolkit headers missing: pip install -r requirements-kernels.txt")
    out = tmp_path_factory.mktemp("kernel_math")
    src, so = out / "shim.cpp", out / "libshim.so"
    src.write_text(SHIM)
    cxx = shutil.which("c++") or "c++"
    subprocess.run(
        [cxx, "-std=c++17", "-O2", "-shared", "-fPIC", f"-I{ROOT}/csrc", f"-I{CUDA_INCLUDE}",
         str(src), "-o", str(so)],
        check=True,
    )  # fmt: skip
    return ctypes.CDLL(str(so))


def _ptr(a: np.ndarray):
    return a.ctypes.data_as(ctypes.POINTER(ctypes.c_float))


def _call(fn, *arrays, n, outs=2, width=1):
    res = [np.zeros(n * width, dtype=np.float32) for _ in range(outs)]
    fn(*[_ptr(a) for a in arrays[:1]], *[_ptr(a) for a in arrays[1:]], ctypes.c_long(n),
       *[_ptr(r) for r in res])  # fmt: skip
    return [torch.from_numpy(r).double() for r in res]


# float32 evaluation of a few ops vs float64: a few ulps (2^-23 relative each); 1e-6 absolute
# on values of size <= cap is ~10x that, far below a wrong formula (differences >> 1e-3).
TOL = 1e-6


@pytest.mark.parametrize("cap", [30.0, 2.0, 0.0])
def test_softcap_value_and_derivative(lib, cap):
    z = torch.linspace(-80, 80, 4001, dtype=torch.float32)
    c, d = [np.zeros(z.numel(), np.float32) for _ in range(2)]
    lib.softcap_many(_ptr(z.numpy()), ctypes.c_long(z.numel()), ctypes.c_float(cap), _ptr(c),
                     _ptr(d))  # fmt: skip
    zz = z.double().requires_grad_(True)
    want = cap * torch.tanh(zz / cap) if cap > 0 else zz * 1.0
    (dwant,) = torch.autograd.grad(want.sum(), zz)
    assert (torch.from_numpy(c).double() - want.detach()).abs().max() <= TOL * max(cap, 80)
    assert (torch.from_numpy(d).double() - dwant).abs().max() <= TOL


def test_gelu_tanh_value_and_derivative(lib):
    x = torch.linspace(-12, 12, 4001, dtype=torch.float32)
    y, d = [np.zeros(x.numel(), np.float32) for _ in range(2)]
    lib.gelu_many(_ptr(x.numpy()), ctypes.c_long(x.numel()), _ptr(y), _ptr(d))
    xx = x.double().requires_grad_(True)
    want = F.gelu(xx, approximate="tanh")
    (dwant,) = torch.autograd.grad(want.sum(), xx)
    assert (torch.from_numpy(y).double() - want.detach()).abs().max() <= 12 * TOL
    assert (torch.from_numpy(d).double() - dwant).abs().max() <= 10 * TOL


def test_online_softmax_merge(lib):
    g = torch.Generator().manual_seed(0)
    m = torch.randn(1000, 2, generator=g, dtype=torch.float64) * 20
    s = torch.rand(1000, 2, generator=g, dtype=torch.float64) * 100 + 1
    m[:5, 0] = -math.inf  # an empty side (rank / tile without rows)
    s[:5, 0] = 0
    m[:2, 1], s[:2, 1] = -math.inf, 0  # both empty
    a = torch.stack([m[:, 0], s[:, 0]], 1).float().numpy().ravel().copy()
    b = torch.stack([m[:, 1], s[:, 1]], 1).float().numpy().ravel().copy()
    out = np.zeros(2000, np.float32)
    lib.merge_many(_ptr(a), _ptr(b), ctypes.c_long(1000), _ptr(out))
    got = torch.from_numpy(out).double().view(1000, 2)
    # merged log-sum-exp vs float64 logaddexp of log(s) + m; both-empty stays (-inf, 0)
    lse = torch.logaddexp(m[:, 0] + torch.log(s[:, 0]), m[:, 1] + torch.log(s[:, 1]))
    ok = torch.isfinite(lse)
    assert ((got[ok, 0] + torch.log(got[ok, 1])) - lse[ok]).abs().max() <= 1e-5
    assert torch.isneginf(got[:2, 0]).all() and (got[:2, 1] == 0).all()
    assert not torch.isnan(got).any()
