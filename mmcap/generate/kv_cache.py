"""Per-layer key/value caches for generation, attached to the decoder's attention modules.

Self-attention: keys/values of every decoded position, in a preallocated buffer
[slots, b, groups_local, head_dim]. Gemma-2 sliding layers keep only ``window`` slots, used as
a ring buffer: the cached keys already carry their RoPE rotation and attention is invariant to
the order of keys, so position ``t`` simply overwrites slot ``t % window`` (HF semantics: query
``i`` sees keys ``i - window < j <= i``). Cross-attention: the projected encoder k/v, computed
on the first step and reused. Beam search reorders the batch rows with :meth:`KVCache.reorder`.

:func:`attach_kv_cache` installs the caches on a decoder stage's layers for one generation
(``SelfAttention`` / ``CrossAttention`` read ``self.kv_cache``) and removes them afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch


class LayerKVCache:
    """Cache of one decoder layer.

    Args:
        slots: self-attention positions kept (max length, or the sliding window).
        window: True when ``slots`` is a sliding window (ring buffer).
    """

    def __init__(self, slots: int, window: bool) -> None:
        self.slots, self.window = slots, window
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0  # positions appended so far
        self.cross: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add one position (k/v [1, b, g, d]); return the keys/values to attend to."""
        if k.shape[0] != 1:
            raise ValueError(f"a cached decode step takes one position, got {k.shape[0]}")
        if self.k is None:
            self.k = k.new_zeros((self.slots, *k.shape[1:]))
            self.v = v.new_zeros((self.slots, *v.shape[1:]))
        if self.length >= self.slots and not self.window:
            raise ValueError(f"KV cache full: {self.slots} positions (raise max_length)")
        slot = self.length % self.slots
        self.k[slot] = k[0]
        self.v[slot] = v[0]
        self.length += 1
        n = min(self.length, self.slots)
        return self.k[:n], self.v[:n]

    def cross_kv(self, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The cross-attention k/v of the encoder output: computed once, then reused."""
        if self.cross is None:
            self.cross = compute()
        return self.cross

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (beam search: the parent beam of every new beam)."""
        if self.k is not None:
            self.k = self.k.index_select(1, index)
            self.v = self.v.index_select(1, index)
        if self.cross is not None:
            self.cross = self.cross.index_select(1, index)


class KVCache:
    """Caches of all layers of one decoder stage.

    Args:
        decoder: the decoder stage (a ``DecoderLanguageModel``); its layers' self-attention
            specs say which layers slide and by how much.
        max_length: decoder positions the generation may reach.
    """

    def __init__(self, decoder: torch.nn.Module, max_length: int) -> None:
        self.layers = []
        for layer in decoder.layers:
            window = layer.self_attention.spec.window
            sliding = window is not None and window < max_length
            self.layers.append(LayerKVCache(window if sliding else max_length, sliding))

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0

    def reorder(self, index: torch.Tensor) -> None:
        for layer in self.layers:
            layer.reorder(index)


@contextlib.contextmanager
def attach_kv_cache(decoder: torch.nn.Module, cache: KVCache):
    """Install ``cache`` on ``decoder``'s attention modules for the ``with`` body."""
    modules = []
    for layer, lc in zip(decoder.layers, cache.layers, strict=True):
        for name in ("self_attention", "cross_attention"):
            attn = getattr(layer, name, None)
            if attn is not None:
                attn.kv_cache = lc
                modules.append(attn)
    try:
        yield cache
    finally:
        for attn in modules:
            attn.kv_cache = None
