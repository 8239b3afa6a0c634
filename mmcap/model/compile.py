"""``torch.compile`` of the transformer layers (``compile.enable``), as torchtitan compiles each
TransformerBlock: every BART encoder / decoder layer and Gemma-2 decoder layer gets its
``forward`` replaced by a compiled one.

Why layers: on one GPU at the recipes' micro-batches (2,048-4,096 tokens) a decoder layer's
kernels take about as long as the host needs to launch them eagerly (~250 aten calls per
Gemma-2 layer forward + backward, measured on CPU); a compiled layer launches fused kernels
from one graph. Layers of one class share compiled code (the parameters are graph inputs), so
Gemma-2's 26 or 42 layers compile twice (sliding-window and global layers), plus once more
with dynamic sequence lengths when the lengths first change.

- Parameter names, state dicts, checkpoints and the HF export are unchanged (only the bound
  ``forward`` is wrapped; module hooks stay eager, e.g. the benchmark's phase timer).
- No graph breaks inside a layer without activation recompute (tests/model/test_compile.py);
  megatron-core's recompute saves the RNG state, which Dynamo does not trace, so with
  ``recompute`` the layer is compiled in pieces around it (same results).
- Transformer Engine layers are not compiled here (refused: untested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmcap.config.errors import ConfigError, require

__all__ = ["CompileConfig", "compile_layers", "compiled_layer_classes"]

BACKENDS = ("inductor", "aot_eager", "eager")


@dataclass
class CompileConfig:
    """``torch.compile`` of the model (torchtitan's ``compile`` section).

    Args:
        enable: compile every encoder / decoder transformer layer.
        backend: torch.compile backend: "inductor" (fused kernels; the point), "aot_eager"
            (tracing only, eager kernels: checks) or "eager".
    """

    enable: bool = False
    backend: str = "inductor"

    def __post_init__(self) -> None:
        require(
            self.backend in BACKENDS,
            "compile.backend",
            f"must be one of {', '.join(BACKENDS)}, got {self.backend!r}",
        )


def compiled_layer_classes() -> tuple[type, ...]:
    from mmcap.model.bart.layers import BartDecoderLayer, BartEncoderLayer
    from mmcap.model.gemma2.layer import Gemma2DecoderLayer

    return (BartEncoderLayer, BartDecoderLayer, Gemma2DecoderLayer)


def compile_layers(chunks: list[torch.nn.Module], backend: str = "inductor") -> int:
    """Compile the transformer layers of ``chunks`` in place; returns how many."""
    from mmcap.parallel.compile import compile_friendly_megatron

    CompileConfig(enable=True, backend=backend)  # (checks the backend)
    layers = [
        m for c in chunks for m in c.modules() if isinstance(m, compiled_layer_classes())
    ]
    for m in layers:
        if getattr(m.config, "transformer_impl", "local") == "transformer_engine":
            raise ConfigError(
                "compile.enable: compiling Transformer Engine layers is not supported here "
                "(untested); set precision.transformer_impl=local or compile.enable=false"
            )
    compile_friendly_megatron()
    for m in layers:
        if not getattr(m, "_mmcap_compiled", False):
            m.forward = torch.compile(m.forward, backend=backend)
            m._mmcap_compiled = True
    return len(layers)
