"""Attention for mmcap models: one `attention()` call over several back-ends.

`attention(q, k, v, *, softmax_scale, causal, softcap, window, kv_padding_mask, dropout_p,
backend)` takes flash-attn's bshd layout and runs on the back-end the registry picks
(`registry.py`): `math` (plain-PyTorch reference, `math_ref.py`), `flex` (FlexAttention,
`flex.py`), `flash` (flash-attn 2, `flash.py`) or `te` (Transformer Engine, `te.py`).
Set MMCAP_ATTN_BACKEND to force one globally.
"""

from mmcap.ops.attention.math_ref import AttnMaskSpec, attention_ref
from mmcap.ops.attention.registry import ENV_VAR, attention, available_backends, select_backend

__all__ = [
    "ENV_VAR",
    "AttnMaskSpec",
    "attention",
    "attention_ref",
    "available_backends",
    "select_backend",
]
