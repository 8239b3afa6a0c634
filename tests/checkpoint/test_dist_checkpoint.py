"""megatron-core distributed checkpoints of the whole model: saved with one TP/PP layout,
loaded with another, every parameter is bit-identical to the source (4 gloo ranks)."""

import os

import pytest
import torch

from mmcap.config import ParallelConfig, PrecisionConfig, get_preset
from mmcap.testing import DistributedWorkers

FP32 = PrecisionConfig("fp32")


def _reference(preset: str) -> dict:
    """Full (global-name) tensors of a seeded model, made at TP=PP=1 on every rank."""
    from mmcap.model.build import build_model
    from mmcap.parallel import initialize_model_parallel
    from mmcap.parallel.tp import full_state_dict

    initialize_model_parallel(ParallelConfig(), seed=1234)
    torch.manual_seed(0)
    full = full_state_dict(build_model(get_preset(preset), precision=FP32))
    g = torch.Generator().manual_seed(1)
    return {k: torch.randn(v.shape, generator=g) for k, v in full.items()}


def _build(preset, tp, pp):
    from mmcap.model.build import build_model
    from mmcap.parallel import initialize_model_parallel

    parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp)
    initialize_model_parallel(parallel, seed=7)
    return build_model(get_preset(preset), parallel, FP32)


def _save(preset, tp, pp, ckpt):
    from mmcap.checkpoint import save_model_checkpoint
    from mmcap.parallel.tp import load_full_state_dict

    full = _reference(preset)
    model = _build(preset, tp, pp)
    load_full_state_dict(
        model, {n: full[model.global_name(n)] for n, _ in model.named_parameters()}
    )
    save_model_checkpoint(model, ckpt, get_preset(preset), {"layout": [tp, pp]})
    return True


def _load_and_compare(preset, tp, pp, ckpt):
    from mmcap.checkpoint import load_model_checkpoint, read_checkpoint_info
    from mmcap.parallel.tp import gather_full

    full = _reference(preset)
    model = _build(preset, tp, pp)
    load_model_checkpoint(model, ckpt)
    mismatched = [
        n
        for n, p in model.named_parameters()
        if not torch.equal(
            gather_full(p)[: full[model.global_name(n)].shape[0]], full[model.global_name(n)]
        )
    ]
    cfg, meta = read_checkpoint_info(ckpt)
    return mismatched, cfg == get_preset(preset), meta


@pytest.fixture(scope="module")
def workers():
    with DistributedWorkers(4, timeout=600) as w:
        yield w


@pytest.mark.parametrize("preset", ["debug-gemma", "debug-florence"])
def test_save_tp2pp2_load_other_layouts(workers, tmp_path, preset):
    ckpt = str(tmp_path / "ckpt")
    assert all(workers.run(_save, preset, 2, 2, ckpt))
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no .partial left behind
    for tp, pp in [(1, 1), (4, 1), (1, 2), (2, 2)]:
        for mismatched, same_cfg, meta in workers.run(_load_and_compare, preset, tp, pp, ckpt):
            assert mismatched == [], f"TP={tp} PP={pp}: {mismatched[:5]}"
            assert same_cfg and meta == {"layout": [2, 2]}


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    from mmcap.checkpoint import read_checkpoint_info

    (tmp_path / "x.partial").mkdir()
    with pytest.raises(FileNotFoundError, match=r"not an mmcap checkpoint.*interrupted save"):
        read_checkpoint_info(tmp_path / "x")


@pytest.mark.parametrize("preset", ["debug-gemma", "debug-florence"])
def test_export_is_layout_independent_and_matches_mmcap(
    workers, tmp_path, preset, single_rank_parallel_state
):
    """Export of a TP=2 PP=2 checkpoint == export of a TP=1 PP=1 one (every tensor), and the
    exported HF model's logits equal mmcap's for the debug presets of both families."""
    from transformers import AutoModelForImageTextToText

    import mmcap.hf  # noqa: F401
    from mmcap.hf.convert_out import export_to_hf, load_full_checkpoint
    from mmcap.model.captioner import CaptioningModel
    from mmcap.parallel.tp import load_full_state_dict

    for tp, pp in [(2, 2), (1, 1)]:
        assert all(workers.run(_save, preset, tp, pp, str(tmp_path / f"ck{tp}{pp}")))
        export_to_hf(tmp_path / f"ck{tp}{pp}", tmp_path / f"hf{tp}{pp}", weights_only=True)
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "hf22" / "model.safetensors"))
    b = load_file(str(tmp_path / "hf11" / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)

    cfg, _, full = load_full_checkpoint(tmp_path / "ck22")
    model = CaptioningModel(cfg, precision=FP32).eval()
    load_full_state_dict(model, full)
    hf = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf22").eval()
    g = torch.Generator().manual_seed(4)
    n = cfg.vision.num_image_tokens
    pixels = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    prompt = torch.randint(3, 900, (2, 6), generator=g)
    dec = torch.randint(3, 900, (2, 9), generator=g)
    with torch.no_grad():
        ours = model(prompt, dec, pixel_values=pixels)[..., : cfg.decoder.vocab_size]
        ids = torch.cat([torch.full((2, n), hf.config.image_token_id), prompt], 1)
        ref = hf(
            input_ids=ids,
            pixel_values=pixels,
            decoder_input_ids=dec,
            attention_mask=torch.ones_like(ids),
        ).logits
    assert (ours - ref).abs().max().item() <= 1e-4
