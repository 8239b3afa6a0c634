"""The Transformer Engine layer spec on a GPU: same model as the local spec (weights copied),
and an FP8 training step. Skipped without CUDA or without Transformer Engine (which cannot be
installed on the CPU machines, nor brought to the lent GPU machine within its time)."""

import pytest
import torch

from mmcap.config import PrecisionConfig, get_preset
from mmcap.model.te import te_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(not te_available(), reason="needs Transformer Engine"),
]


def _inputs(model, b=4, s=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = model.vision.image_size
    return (
        torch.randint(3, 50, (b, 8), generator=g).cuda(),
        torch.randint(3, 50, (b, s), generator=g).cuda(),
        torch.randn(b, 3, v, v, generator=g).cuda(),
    )


def _pair(preset, dtype):
    from mmcap.model.captioner import CaptioningModel

    model = get_preset(preset)
    local = CaptioningModel(model, precision=PrecisionConfig(dtype, transformer_impl="local"))
    te = CaptioningModel(
        model, precision=PrecisionConfig(dtype, transformer_impl="transformer_engine")
    )
    missing, unexpected = te.load_state_dict(local.state_dict(), strict=False)
    assert not unexpected
    assert all(k.endswith("_extra_state") for k in missing), missing
    return model, local.cuda().eval(), te.cuda().eval()


@pytest.mark.parametrize("preset", ["debug-gemma", "debug-florence"])
def test_te_spec_equals_local_spec(single_rank_parallel_state, preset):
    from megatron.core.extensions.transformer_engine import TEColumnParallelLinear

    model, local, te = _pair(preset, "fp32")
    assert any(isinstance(m, TEColumnParallelLinear) for m in te.modules())
    prompt, ids, pixels = _inputs(model)
    with torch.no_grad():
        a = local(prompt, ids, pixel_values=pixels).float()
        b = te(prompt, ids, pixel_values=pixels).float()
    # TF32 may be on inside TE's GEMMs: relative to the logits' scale.
    assert (a - b).abs().max().item() <= 2e-3 * max(1.0, a.abs().max().item())


def test_fp8_training_step_is_finite_and_close_to_bf16(single_rank_parallel_state):
    from mmcap.model.captioner import CaptioningModel

    model = get_preset("debug-gemma")
    losses = {}
    for fp8 in (None, "hybrid"):
        torch.manual_seed(0)
        prec = PrecisionConfig("bf16", transformer_impl="transformer_engine", fp8=fp8)
        m = CaptioningModel(model, precision=prec).cuda().train()
        prompt, ids, pixels = _inputs(model)
        loss = m(prompt, ids, pixel_values=pixels, labels=ids).float()
        loss.sum().backward()
        grads = [p.grad for p in m.parameters() if p.requires_grad and p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        losses[fp8] = loss.mean().item()
    assert abs(losses["hybrid"] - losses[None]) <= 0.05 * abs(losses[None]), losses
