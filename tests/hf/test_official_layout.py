"""The paper's released-model layout on tiny random models of both families:
``tools/convert_to_hf.py --layout official`` writes it, ``tools/convert_from_hf.py --official``
reads it, and import -> export -> import is bit-exact (tensors and ModelConfig). Also the
official import's encoder ids (BART <pad> 1 from ``encoder_pad_token_id``, not the Gemma pad 0)
as seen by the exported HF model, the Florence logit soft-cap on import, and the preset check
naming a field that does not fit.

The importer itself is checked against hand-built official directories in test_convert.py.
"""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

import mmcap.hf  # noqa: F401  (Auto-class registration)
from mmcap.config import get_preset
from mmcap.hf.convert_in import Converted, write_checkpoint
from mmcap.hf.convert_out import load_full_checkpoint
from mmcap.hf.io import safetensors_files
from tools.convert_from_hf import main as convert_from_hf
from tools.convert_to_hf import main as convert_to_hf

IMAGE = 64  # debug presets: 5 image tokens
TEMPORAL = "visual_temporal_embed.pos_idx_to_embed"  # a buffer the import recomputes and checks


def _random_checkpoint(cfg, out):
    """A checkpoint of ``cfg`` with every tensor random (norms near 1, gates non-zero)."""
    from mmcap.config import PrecisionConfig
    from mmcap.model.captioner import CaptioningModel
    from mmcap.parallel.tp import full_state_dict

    torch.manual_seed(0)
    full = full_state_dict(CaptioningModel(cfg, precision=PrecisionConfig("fp32")))
    g = torch.Generator().manual_seed(1)
    for k, t in full.items():
        full[k] = torch.randn(t.shape, generator=g) * (0.2 if "norm" in k else 0.05)
        if "norm" in k and k.endswith("weight") and cfg.decoder.arch == "bart":
            full[k] += 1.0
    # Rows past the vocabulary only pad it for TP (their logits are masked); as in every
    # converted checkpoint they hold zeros, which is what an import writes there.
    full["decoder.embedding.word_embeddings.weight"][cfg.decoder.vocab_size :] = 0.0
    write_checkpoint(Converted(cfg, full), out)
    return full


def _export_official(ckpt, out) -> int:
    return convert_to_hf(["--ckpt", str(ckpt), "--out", str(out), "--layout", "official"])


def _tensors(d):
    out = {}
    for f in safetensors_files(d):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module", params=["debug-florence", "debug-gemma"])
def trip(request, tmp_path_factory, single_rank_parallel_state):
    """mmcap ckpt A -> official O1 -> import B -> official O2 -> import C."""
    d = tmp_path_factory.mktemp(request.param)
    full = _random_checkpoint(get_preset(request.param), d / "A")
    imp = ["--image-size", str(IMAGE)]
    assert _export_official(d / "A", d / "O1") == 0
    assert convert_from_hf(["--official", str(d / "O1"), *imp, "--out", str(d / "B")]) == 0
    assert _export_official(d / "B", d / "O2") == 0
    assert convert_from_hf(["--official", str(d / "O2"), *imp, "--out", str(d / "C")]) == 0
    return {"dir": d, "full": full, "preset": request.param}


def test_round_trip_is_bit_exact(trip):
    d = trip["dir"]
    cfg_b, _, b = load_full_checkpoint(d / "B")
    cfg_c, _, c = load_full_checkpoint(d / "C")
    a = trip["full"]
    assert set(a) == set(b) == set(c)
    for k in a:
        assert torch.equal(a[k], b[k]) and torch.equal(b[k], c[k]), k
    assert cfg_b == cfg_c
    o1, o2 = _tensors(d / "O1"), _tensors(d / "O2")
    assert set(o1) == set(o2) and len(o1) > 60
    for k in o1:
        assert torch.equal(o1[k], o2[k]), k
    c1, c2 = (json.loads((d / n / "config.json").read_text()) for n in ("O1", "O2"))
    assert c1 == c2


def test_layout_keys_and_config(trip):
    """SYSTEM.md "The official checkpoint layout": namespaces, model types, vocab fields, ids."""
    d = trip["dir"]
    keys = set(_tensors(d / "O1"))
    roots = (
        "vision_tower.",
        "image_projection",
        "image_proj_norm.",
        "image_pos_embed.",
        "visual_temporal_embed.",
        "language_model.model.encoder.",
        "language_model.model.decoder.",
        "language_model.lm_head.",
    )
    assert all(k.startswith(roots) for k in keys)
    assert all(any(k.startswith(r) for k in keys) for r in roots)
    assert TEMPORAL in keys
    cfg = json.loads((d / "O1" / "config.json").read_text())
    text, vision = cfg["text_config"], cfg["vision_config"]
    assert (cfg["model_type"], text["model_type"], vision["model_type"]) == (
        "florence2",
        "florence2_language",
        "davit",
    )
    preset = get_preset(trip["preset"])
    assert text["encoder_vocab_size"] == preset.encoder.padded_vocab_size
    assert text["vocab_size"] == cfg["vocab_size"] == preset.decoder.vocab_size
    assert (text["encoder_bos_token_id"], text["encoder_pad_token_id"]) == (0, 1)
    assert text["encoder_eos_token_id"] == 2
    assert (text["pad_token_id"], text["eos_token_id"], text["bos_token_id"]) == (0, 1, 2)
    assert text["max_position_embeddings"] == preset.encoder.max_position_embeddings
    if trip["preset"] == "debug-gemma":
        g = text["gemma_config"]
        assert g["encoder_hidden_size"] == 64 and g["encoder_attn_every_x_layers"] == 1
        assert any(".encoder_attn_gate" in k for k in keys)
        assert any(".post_encoder_attention_layernorm." in k for k in keys)
    else:
        assert "gemma_config" not in text
        assert any(".encoder_attn.k_proj." in k for k in keys)


def test_import_sets_encoder_pad_and_florence_cap(trip):
    cfg, _, _ = load_full_checkpoint(trip["dir"] / "B")
    assert cfg.encoder.pad_token_id == 1  # encoder_pad_token_id, not the Gemma pad_token_id 0
    assert cfg.decoder.pad_token_id == 0
    assert cfg.decoder.final_logit_softcap == 30.0  # Florence: official constant; Gemma: config


def test_exported_hf_masks_bart_pad_without_attention_mask(trip, tmp_path):
    """Official import -> HF export: generation without an attention mask masks BART <pad>
    (1), exactly as with the explicit mask, and leaves BART <s> (0) visible."""
    from transformers import AutoModelForImageTextToText

    d = trip["dir"]
    out = str(tmp_path / "hf")
    assert convert_to_hf(["--ckpt", str(d / "B"), "--out", out, "--weights-only"]) == 0
    hf = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.text_config.pad_token_id == 1 and hf.config.pad_token_id == 0
    g = torch.Generator().manual_seed(3)
    pixels = torch.randn(2, 3, IMAGE, IMAGE, generator=g)
    prompt = torch.randint(3, 900, (2, 7), generator=g)
    prompt[:, 0] = 0  # BART <s>
    prompt[1, -3:] = 1  # BART <pad>
    ids = torch.cat([torch.full((2, 5), hf.config.image_token_id), prompt], 1)
    kw = {"pixel_values": pixels, "input_ids": ids, "max_new_tokens": 4, "min_new_tokens": 4}
    kw["num_beams"] = 1  # one row per sample in the step logits
    kw["output_logits"], kw["return_dict_in_generate"] = True, True
    implicit = hf.generate(**kw)
    explicit = hf.generate(**kw, attention_mask=(ids != 1).long())
    unmasked = hf.generate(**kw, attention_mask=torch.ones_like(ids))
    assert torch.equal(implicit.sequences, explicit.sequences)
    a, b, u = (torch.stack(x.logits, 1) for x in (implicit, explicit, unmasked))
    assert torch.equal(a, b)
    assert (a[1] - u[1]).abs().max().item() > 1e-4  # the mask matters for the padded sample


@pytest.mark.parametrize("trip", ["debug-florence"], indirect=True)
def test_preset_that_does_not_fit_names_the_field(trip, tmp_path, capsys):
    """A checkpoint whose position table differs from the preset's fails the preset check
    (not a shape error later)."""
    base = get_preset("debug-florence")
    cfg = dataclasses.replace(
        base,
        encoder=dataclasses.replace(base.encoder, max_position_embeddings=128),
        decoder=dataclasses.replace(base.decoder, max_position_embeddings=128),
    )
    _random_checkpoint(cfg, tmp_path / "A")
    assert _export_official(tmp_path / "A", tmp_path / "O") == 0
    args = ["--official", str(tmp_path / "O"), "--image-size", str(IMAGE)]
    preset = ["--preset", "debug-florence"]
    assert convert_from_hf([*args, *preset, "--out", str(tmp_path / "B")]) == 1
    err = capsys.readouterr().err
    assert "encoder.max_position_embeddings is 256 in the preset, 128 in the checkpoint" in err
    assert not (tmp_path / "B").exists()
    assert convert_from_hf([*args, "--out", str(tmp_path / "B")]) == 0  # fine without a preset
    o = trip["dir"] / "O1"  # the right shape, checked field by field: passes
    args = ["--official", str(o), "--image-size", str(IMAGE), *preset]
    assert convert_from_hf([*args, "--out", str(tmp_path / "P")]) == 0


def test_model_the_official_code_cannot_hold_is_refused(
    tmp_path, single_rank_parallel_state, capsys
):
    base = get_preset("debug-florence")
    uncapped = dataclasses.replace(base.decoder, final_logit_softcap=None)
    _random_checkpoint(dataclasses.replace(base, decoder=uncapped), tmp_path / "A")
    assert _export_official(tmp_path / "A", tmp_path / "O") == 1
    assert "decoder.final_logit_softcap" in capsys.readouterr().err
    assert not (tmp_path / "O").exists()


# Fields of the official data/pretrained/*/config.json (read from the paper's repository).
_LARGE_VISION = ((256, 512, 1024, 2048), (8, 16, 32, 64), 1024)
_BART_BASE = (768, 6, 12, 3072, 1024, 51328, 257024)
_BART_LARGE = (1024, 12, 16, 4096, 4096, 51328, 257024)
_GEMMA_BART = (1024, 12, 16, 4096, 4096, 51289, 256000)
_GEMMA_2B = (2304, 26, 9216, 8, 4)
_GEMMA_9B = (3584, 42, 14336, 16, 8)
OFFICIAL_FACTS = {
    "florence-2-base": (_BART_BASE, (128, 256, 512, 1024), (4, 8, 16, 32), 768, None),
    "florence-2-large": (_BART_LARGE, *_LARGE_VISION, None),
    "florence-gemma-2-large": (_GEMMA_BART, *_LARGE_VISION, _GEMMA_2B),
    "florence-gemma-2-xlarge": (_GEMMA_BART, *_LARGE_VISION, _GEMMA_9B),
}


@pytest.mark.parametrize("preset", list(OFFICIAL_FACTS))
def test_exported_config_of_each_paper_preset_equals_the_official_one(preset):
    from mmcap.hf.official_layout import official_config

    bart, dims, heads, proj, gemma = OFFICIAL_FACTS[preset]
    cfg = official_config(get_preset(preset))
    t, v = cfg["text_config"], cfg["vision_config"]
    d, layers, n_heads, ffn, positions, enc_vocab, vocab = bart
    assert (t["d_model"], t["encoder_layers"], t["decoder_layers"]) == (d, layers, layers)
    assert (t["encoder_attention_heads"], t["decoder_attention_heads"]) == (n_heads, n_heads)
    assert (t["encoder_ffn_dim"], t["decoder_ffn_dim"]) == (ffn, ffn)
    assert t["max_position_embeddings"] == positions
    assert (t["encoder_vocab_size"], t["vocab_size"]) == (enc_vocab, vocab)
    assert (t["encoder_pad_token_id"], t["pad_token_id"], t["eos_token_id"]) == (1, 0, 1)
    assert (t["bos_token_id"], t["decoder_start_token_id"]) == (2, 1)
    assert (tuple(v["dim_embed"]), tuple(v["num_heads"]), tuple(v["num_groups"])) == (
        dims,
        heads,
        heads,
    )
    assert (tuple(v["depths"]), v["projection_dim"], v["window_size"]) == ((1, 1, 9, 1), proj, 12)
    assert v["drop_path_rate"] == 0.1
    if gemma is None:
        assert "gemma_config" not in t
        return
    g = t["gemma_config"]
    hidden, n_layers, inter, q_heads, kv_heads = gemma
    assert (g["hidden_size"], g["num_hidden_layers"], g["intermediate_size"]) == (
        hidden,
        n_layers,
        inter,
    )
    assert (g["num_attention_heads"], g["num_key_value_heads"], g["head_dim"]) == (
        q_heads,
        kv_heads,
        256,
    )
    assert (g["final_logit_softcapping"], g["attn_logit_softcapping"]) == (30.0, 50.0)
    assert (g["sliding_window"], g["query_pre_attn_scalar"], g["max_position_embeddings"]) == (
        4096,
        256,
        8192,
    )
    assert (g["vocab_size"], g["rope_theta"], g["rms_norm_eps"]) == (256000, 10000.0, 1e-6)
    assert g["encoder_hidden_size"] == 1024
