"""Transformer Engine in mmcap: availability, the ``transformer_impl`` switch and FP8.

``PrecisionConfig.transformer_impl`` picks the linear and norm layers of the encoder and
decoder layers (:mod:`mmcap.model.specs`): ``"local"`` = megatron-core's own tensor-parallel
linears and mmcap's torch norms (CPU, any GPU); ``"transformer_engine"`` = megatron-core's TE
extension (TEColumnParallelLinear / TERowParallelLinear / TENorm); ``"auto"`` = Transformer
Engine when it is importable and CUDA is available, else local. ``precision.fp8`` needs
Transformer Engine: the layers then run under TE's FP8 autocast (megatron-core's
``get_fp8_context``: around the layer loop for the delayed recipe, per layer otherwise, as
megatron-core's TransformerBlock), while mmcap's attention core (soft-capped, a back-end of
:mod:`mmcap.ops.attention`) and the LM-head loss are not TE modules and stay in bf16.

Transformer Engine's PyTorch bindings are source-only on PyPI: ``pip install
--no-build-isolation "transformer_engine[pytorch]"`` compiles them against the local CUDA
toolkit and cuDNN (tens of minutes), or use an NGC PyTorch container, which ships them.
"""

from __future__ import annotations

import contextlib
import functools

from mmcap.config import ConfigError

TE_INSTALL_HINT = (
    "install Transformer Engine (its PyTorch bindings build from source: pip install "
    '--no-build-isolation "transformer_engine[pytorch]" with the CUDA toolkit and cuDNN '
    "headers present, or use an NGC PyTorch container)"
)


@functools.cache
def te_available() -> bool:
    """Whether ``transformer_engine.pytorch`` imports (cached: the answer cannot change)."""
    try:
        import transformer_engine.pytorch  # noqa: F401  (the import is the check)
    except Exception:  # ImportError, or a build that fails to load its CUDA library
        return False
    return True


def resolve_transformer_impl(precision) -> str:
    """``"local"`` or ``"transformer_engine"`` for ``precision`` (a PrecisionConfig), or a
    ConfigError naming the field and what to install when Transformer Engine is needed and
    missing. FP8 implies Transformer Engine."""
    import torch  # here: configs are parsed without importing torch

    impl = precision.transformer_impl
    fp8 = precision.fp8 is not None
    if impl == "auto":
        if fp8 or (te_available() and torch.cuda.is_available()):
            impl = "transformer_engine"
        else:
            impl = "local"
    if impl != "transformer_engine":
        return impl
    field = "precision.fp8" if fp8 else "precision.transformer_impl"
    what = f"FP8 training (precision.fp8={precision.fp8!r})" if fp8 else "transformer_engine"
    if not te_available():
        raise ConfigError(
            f"{field}: {what} needs Transformer Engine, which is not importable here; "
            f"{TE_INSTALL_HINT}, or "
            + ("remove precision.fp8 to train in bf16" if fp8 else "set it to local or auto")
        )
    if not torch.cuda.is_available():
        raise ConfigError(
            f"{field}: {what} runs Transformer Engine kernels, which need CUDA, and no GPU is "
            + ("visible; remove precision.fp8" if fp8 else "visible; set it to local or auto")
        )
    return impl


def fp8_stack_context(config):
    """Around a stack's loop over its layers: TE's FP8 autocast once per forward for the delayed
    recipe (its amax history is reduced once, on leaving; megatron-core's TransformerBlock does
    the same), else a null context."""
    if not config.fp8 or config.fp8_recipe != "delayed":
        return contextlib.nullcontext()
    from megatron.core.fp8_utils import get_fp8_context

    return get_fp8_context(config)


def fp8_layer_context(config, layer_idx: int):
    """Around global layer ``layer_idx``: TE's FP8 autocast per layer for the current-scaling
    recipes ("tensorwise", "blockwise", "mxfp8"; megatron-core's ``get_fp8_context``, which
    also keeps ``first_last_layers_bf16`` layers in bf16), else a null context (no FP8, or the
    delayed recipe's stack-wide context)."""
    if not config.fp8 or config.fp8_recipe == "delayed":
        return contextlib.nullcontext()
    from megatron.core.fp8_utils import get_fp8_context

    return get_fp8_context(config, layer_idx)
