"""Forward / forward+backward time and TFLOP/s of each attention back-end
(:mod:`mmcap.ops.attention` registry) on the Gemma-2 2B / 9B decoder attention calls
(``tools/benchmark.py --attention-only``).

Calls per model (:func:`attention_cases`): decoder self-attention with soft-cap 50 on a sliding
(window 4096) and a global layer, the non-causal cross-attention over the encoder output with
encoder padding (no soft-cap), and the BART encoder self-attention. FLOPs: QK^T and AV over
the attended (query, key) pairs (:func:`mmcap.train.flops.attended_keys`, as the trainer
counts them); forward+backward = 3x forward (the backward of the two matmuls computes two
gradients each, :mod:`mmcap.train.flops`).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

from mmcap.train.flops import attended_keys

__all__ = ["AttentionCase", "attention_cases", "run_attention_benchmark"]


@dataclass(frozen=True)
class AttentionCase:
    """One attention call: shapes and features (bshd layout)."""

    name: str
    batch: int
    s_q: int
    s_k: int
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool
    softcap: float | None = None
    window: int | None = None
    padded_keys: int = 0  # trailing padded encoder rows per sample (kv padding mask)

    def attended_pairs(self) -> int:
        if self.causal:
            return self.batch * attended_keys(self.s_q, self.window)
        return self.batch * self.s_q * (self.s_k - self.padded_keys)

    def forward_flops(self) -> float:
        return 4.0 * self.attended_pairs() * self.heads * self.head_dim


def attention_cases(model: str, batch: int, target: int, encoder: int) -> list[AttentionCase]:
    """The decoder and encoder attention calls of a model.

    Args:
        model: "2b" (florence-gemma-2-large) or "9b" (florence-gemma-2-xlarge); or "tiny"
            for CPU smoke runs (the 2B call structure at head_dim 32).
        batch / target / encoder: micro-batch, decoder length, encoder length (image + prompt
            tokens; the last eighth is padding in the cross-attention call).
    """
    heads, kv, dim = {"2b": (8, 4, 256), "9b": (16, 8, 256), "tiny": (4, 2, 32)}[model]
    window = 4096 if model != "tiny" else max(target // 2, 1)
    pad = encoder // 8
    return [
        AttentionCase(
            f"{model} self sliding", batch, target, target, heads, kv, dim, True, 50.0, window
        ),
        AttentionCase(f"{model} self global", batch, target, target, heads, kv, dim, True, 50.0),
        AttentionCase(
            f"{model} cross (enc pad)",
            batch,
            target,
            encoder,
            heads,
            kv,
            dim,
            False,
            None,
            None,
            pad,
        ),
        AttentionCase(
            "bart encoder self",
            batch,
            encoder,
            encoder,
            16 if model != "tiny" else 4,
            16 if model != "tiny" else 4,
            64 if model != "tiny" else 16,
            False,
        ),
    ]


def _inputs(case: AttentionCase, device, dtype, grad: bool):
    g = torch.Generator(device="cpu").manual_seed(0)

    def t(s, h):
        x = torch.randn(case.batch, s, h, case.head_dim, generator=g).to(device, dtype)
        return x.requires_grad_(grad)

    q, k, v = t(case.s_q, case.heads), t(case.s_k, case.kv_heads), t(case.s_k, case.kv_heads)
    mask = None
    if case.padded_keys:
        mask = torch.ones(case.batch, case.s_k, dtype=torch.bool, device=device)
        mask[:, case.s_k - case.padded_keys :] = False
    return q, k, v, mask


def _time(fn, iters: int) -> float:
    """Median seconds of ``fn`` over ``iters`` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(iters):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _time_backend(row: dict, case: AttentionCase, name: str, feats: dict, device, dtype, iters):
    """Fill ``row`` with the forward (and, where the back-end has one, forward+backward) time
    and TFLOP/s of ``case`` on back-end ``name``."""
    from mmcap.ops.attention import registry

    q, k, v, mask = _inputs(case, device, dtype, grad=False)
    registry.select_backend(q, k, v, kv_padding_mask=mask, backend=name, **feats)
    call = functools.partial(
        registry.attention,
        softmax_scale=case.head_dim**-0.5,
        kv_padding_mask=mask,
        backend=name,
        **feats,
    )
    with torch.no_grad():
        row["fwd_ms"] = _time(lambda: call(q, k, v), iters) * 1e3
    flops = case.forward_flops()
    row["tflops_fwd"] = flops / (row["fwd_ms"] / 1e3) / 1e12
    qg, kg, vg, _ = _inputs(case, device, dtype, grad=True)
    ok, why = registry.BACKENDS[name].supports(
        qg, kg, vg, kv_padding_mask=mask, dropout_p=0.0, **feats
    )
    if not ok:
        row["note"] = f"forward only: {why}"
        row["tflops"] = row["tflops_fwd"]
        return
    row["fwd_bwd_ms"] = _time(lambda: call(qg, kg, vg).sum().backward(), iters) * 1e3
    row["tflops"] = 3 * flops / (row["fwd_bwd_ms"] / 1e3) / 1e12


def run_attention_benchmark(
    cases: list[AttentionCase], device, dtype: torch.dtype, iters: int = 5, backends=None
) -> list[dict]:
    """Time every (case, back-end) the registry can run; a back-end that cannot run a call
    (or has no backward there) gets a row saying why."""
    from mmcap.ops.attention import registry

    names = backends or registry.available_backends(device)
    rows = []
    for case in cases:
        feats = {"causal": case.causal, "softcap": case.softcap, "window": case.window}
        for name in names:
            row = {"shape": case.name, "backend": name, "case": case.__dict__}
            try:
                _time_backend(row, case, name, feats, device, dtype, iters)
            except (RuntimeError, ValueError) as e:
                row["note"] = f"cannot run: {str(e).splitlines()[0][:120]}"
            rows.append(row)
    return rows
