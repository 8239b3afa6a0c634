"""mmcap's generation (cached) gives the same tokens as the exported HF model's ``generate()``
(tools/convert_from_hf.py -> tools/convert_to_hf.py), greedy and beam, with and without a
zero-shot prefix, on both families; the Gemma decoder's sliding window (4) is shorter than the
output."""

from __future__ import annotations

import pytest
import torch

import mmcap.hf  # noqa: F401  (Auto-class registration)
from mmcap.config import PrecisionConfig
from mmcap.data.testing import build_tiny_bart_tokenizer, build_tiny_gemma_tokenizer
from mmcap.generate import GenerationConfig, generate
from mmcap.hf.convert_out import load_full_checkpoint
from mmcap.testing.hf_models import tiny_florence2, tiny_gemma2
from tools.convert_from_hf import main as convert_from_hf
from tools.convert_to_hf import main as convert_to_hf

IMAGE, N_IMG, NEW = 64, 5, 12
XATTN_SCALE = 5.0


@pytest.fixture(scope="module")
def models(tmp_path_factory, single_rank_parallel_state):
    from transformers import AutoModelForImageTextToText

    from mmcap.model.captioner import CaptioningModel
    from mmcap.parallel.tp import load_full_state_dict

    d = tmp_path_factory.mktemp("gen_hf")
    florence = tiny_florence2(0, image_token_id=999)
    florence.save_pretrained(d / "florence")
    build_tiny_bart_tokenizer(d / "florence")
    gtok = build_tiny_gemma_tokenizer(d / "gemma_tok")
    tiny_gemma2(0, vocab_size=600).save_pretrained(d / "gemma")
    common = ["--florence", str(d / "florence"), "--gemma-tokenizer", str(gtok)]
    common += ["--image-size", str(IMAGE)]
    out = {}
    for name, extra in (("f", []), ("g", ["--gemma", str(d / "gemma")])):
        assert convert_from_hf([*common, *extra, "--out", str(d / f"ck_{name}")]) == 0
        assert convert_to_hf(["--ckpt", str(d / f"ck_{name}"), "--out", str(d / f"hf_{name}")]) == 0
        cfg, _, full = load_full_checkpoint(d / f"ck_{name}")
        ours = CaptioningModel(cfg, precision=PrecisionConfig("fp32")).eval()
        load_full_state_dict(ours, full)
        # Open the gates and strengthen cross-attention (the same change on both sides) so
        # that the image and prompt decide the tokens.
        with torch.no_grad():
            for n, p in ours.named_parameters():
                if n.endswith("cross_attention.gate"):
                    p.fill_(1.0)
                elif ".cross_attention.linear_" in n and n.endswith("weight"):
                    p.mul_(XATTN_SCALE)
        hf = AutoModelForImageTextToText.from_pretrained(d / f"hf_{name}").eval()
        with torch.no_grad():
            for n, p in hf.named_parameters():
                if n.endswith("encoder_attn_gate"):
                    p.fill_(1.0)
                elif ".encoder_attn." in n and n.endswith("weight"):
                    p.mul_(XATTN_SCALE)
        out[name] = (ours, hf)
    return out


def _inputs(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(b, 3, IMAGE, IMAGE, generator=g)
    prompt = torch.randint(3, 400, (b, 6), generator=g)
    mask = torch.ones(b, 6, dtype=torch.bool)
    mask[1, 4:] = False
    return pixels, prompt, mask


def _hf_generate(hf, pixels, prompt, mask, cfg: GenerationConfig, prefix):
    b = prompt.shape[0]
    ids = torch.cat([torch.full((b, N_IMG), hf.config.image_token_id), prompt], 1)
    am = torch.cat([torch.ones(b, N_IMG, dtype=torch.long), mask.long()], 1)
    kwargs = {}
    if prefix:  # the official eval's decoder_input_ids: [<bos>, prefix...]
        kwargs["decoder_input_ids"] = torch.tensor([[cfg.bos_token_id, *prefix]] * b)
    with torch.no_grad():
        seqs = hf.generate(
            input_ids=ids, pixel_values=pixels, attention_mask=am, do_sample=False,
            num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens,
            early_stopping=cfg.early_stopping, length_penalty=cfg.length_penalty,
            no_repeat_ngram_size=cfg.no_repeat_ngram_size,
            decoder_start_token_id=cfg.decoder_start_token_id,
            forced_bos_token_id=cfg.bos_token_id, forced_eos_token_id=cfg.forced_eos_token_id,
            eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id, use_cache=True,
            **kwargs,
        )
    p = 1 if not prefix else 2 + len(prefix)
    out = []
    for seq in seqs.tolist():
        assert seq[:p] == ([1] if not prefix else [1, 2, *prefix])
        new = seq[p:]
        new = new[: new.index(1)] if 1 in new else new
        out.append(new[1:] if not prefix and new[:1] == [2] else new)
    return out


@pytest.mark.parametrize("name", ["f", "g"])
@pytest.mark.parametrize("beams,prefix", [(1, None), (4, None), (4, [17, 18])])
def test_same_tokens_as_hf_generate(models, name, beams, prefix):
    ours, hf = models[name]
    pixels, prompt, mask = _inputs()
    cfg = GenerationConfig(num_beams=beams, max_new_tokens=NEW)
    got = generate(
        ours, prompt, mask, pixel_values=pixels, prefix_ids=[prefix] * 3, config=cfg
    )
    ref = _hf_generate(hf, pixels, prompt, mask, cfg, prefix)
    assert got == ref
    assert max(len(t) for t in got) > 4  # longer than the sliding window
    assert got[0] != got[2]
