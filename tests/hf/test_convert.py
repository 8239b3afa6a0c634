"""Checkpoint conversion (tools/convert_from_hf.py, tools/convert_to_hf.py) on tiny random
Hugging Face models built locally: round trips, logit parity of exported models, the mean-rule
remap against an independent computation, the official layout, TP/PP-independent export, and
bad input."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mmcap.hf  # noqa: F401  (Auto-class registration)
from mmcap.data.testing import build_tiny_bart_tokenizer, build_tiny_gemma_tokenizer
from mmcap.hf.convert_out import load_full_checkpoint
from mmcap.testing.hf_models import tiny_florence2, tiny_gemma2
from tools.convert_from_hf import main as convert_from_hf
from tools.convert_to_hf import main as convert_to_hf

IMAGE = 64  # 5 image tokens
HF_DEC = "model.language_model.decoder."


@pytest.fixture(scope="module")
def work(tmp_path_factory, single_rank_parallel_state):
    d = tmp_path_factory.mktemp("convert")
    florence = tiny_florence2(0, image_token_id=999)
    florence.save_pretrained(d / "florence")
    build_tiny_bart_tokenizer(d / "florence")
    gtok = build_tiny_gemma_tokenizer(d / "gemma_tok")
    gemma = tiny_gemma2(0, vocab_size=600)
    gemma.save_pretrained(d / "gemma")
    common = ["--gemma-tokenizer", str(gtok), "--image-size", str(IMAGE)]
    assert (
        convert_from_hf(["--florence", str(d / "florence"), *common, "--out", str(d / "ck_f")]) == 0
    )
    assert (
        convert_from_hf(
            [
                "--florence",
                str(d / "florence"),
                "--gemma",
                str(d / "gemma"),
                *common,
                "--out",
                str(d / "ck_g"),
            ]
        )
        == 0
    )
    for name in ("f", "g"):
        assert convert_to_hf(["--ckpt", str(d / f"ck_{name}"), "--out", str(d / f"hf_{name}")]) == 0
    return {"dir": d, "florence": florence, "gemma": gemma, "gtok": gtok}


def _hf_tensors(path: Path) -> dict:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _inputs(n_img=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(2, 3, IMAGE, IMAGE, generator=g)
    prompt = torch.randint(3, 400, (2, 6), generator=g)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    dec = torch.randint(3, 500, (2, 7), generator=g)
    return pixels, prompt, mask, dec


def _hf_logits(hf, image_token, pixels, prompt, mask, dec, n_img=5):
    b = prompt.shape[0]
    ids = torch.cat([torch.full((b, n_img), image_token), prompt], 1)
    am = torch.cat([torch.ones(b, n_img, dtype=torch.long), mask.long()], 1)
    with torch.no_grad():
        return hf(
            input_ids=ids, pixel_values=pixels, attention_mask=am, decoder_input_ids=dec
        ).logits


def _mmcap_logits(ckpt, pixels, prompt, mask, dec):
    from mmcap.config import PrecisionConfig
    from mmcap.model.captioner import CaptioningModel
    from mmcap.parallel.tp import load_full_state_dict

    cfg, _, full = load_full_checkpoint(ckpt)
    model = CaptioningModel(cfg, precision=PrecisionConfig("fp32")).eval()
    load_full_state_dict(model, full)
    with torch.no_grad():
        return model(prompt, dec, mask, pixel_values=pixels)[..., : cfg.decoder.vocab_size], cfg


@pytest.mark.parametrize("name", ["f", "g"])
def test_exported_model_logits_equal_mmcap(work, name):
    from transformers import AutoModelForImageTextToText

    d = work["dir"]
    hf = AutoModelForImageTextToText.from_pretrained(d / f"hf_{name}").eval()
    pixels, prompt, mask, dec = _inputs()
    ours, cfg = _mmcap_logits(d / f"ck_{name}", pixels, prompt, mask, dec)
    ref = _hf_logits(hf, hf.config.image_token_id, pixels, prompt, mask, dec)
    assert (ours - ref).abs().max().item() <= 1e-4
    # Florence sizes: --florence import and the HF export both carry the final logit cap 30.
    cap = 30.0 if name == "f" else 15.0  # tiny Gemma-2: its own config's cap
    assert cfg.decoder.final_logit_softcap == cap and hf.config.logit_softcap() == cap


def test_round_trip_is_bit_exact(work):
    """HF -> mmcap -> HF: every tensor present on both sides is identical."""
    d = work["dir"]
    src = work["florence"].state_dict()
    for name in ("f", "g"):
        out = _hf_tensors(d / f"hf_{name}")
        common = [
            k
            for k in out
            if k in src
            and "shared" not in k
            and not (name == "g" and k.startswith(HF_DEC))
            and not k.startswith(HF_DEC + "embed_tokens")
            and k != "lm_head.weight"
        ]
        assert len(common) > 50
        for k in common:
            assert torch.equal(out[k], src[k]), k
    out = _hf_tensors(d / "hf_g")
    for k, v in work["gemma"].state_dict().items():
        if k == "lm_head.weight":
            continue
        assert torch.equal(out[HF_DEC + k[len("model.") :]], v), k


def test_gate_zero_decoder_equals_source_gemma(work):
    from transformers import AutoModelForImageTextToText

    hf = AutoModelForImageTextToText.from_pretrained(work["dir"] / "hf_g").eval()
    pixels, prompt, mask, _ = _inputs()
    dec = torch.randint(3, 600, (2, 12))  # longer than the window (4)
    ours = _hf_logits(hf, hf.config.image_token_id, pixels, prompt, mask, dec)
    with torch.no_grad():
        ref = work["gemma"](input_ids=dec).logits
    assert (ours - ref).abs().max().item() <= 1e-4


def test_remapped_rows_follow_the_mean_rule(work):
    """Independent of mmcap.hf.remap: one tokenizer call per piece, explicit loop."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    d = work["dir"]
    _, meta, full = load_full_checkpoint(d / "ck_f")
    table = full["decoder.embedding.word_embeddings.weight"]
    shared = work["florence"].state_dict()["model.language_model.shared.weight"]
    sp = spm.SentencePieceProcessor(model_file=str(work["gtok"]))
    bart = AutoTokenizer.from_pretrained(d / "florence")
    specials = {
        0: bart.pad_token_id,
        1: bart.eos_token_id,
        2: bart.bos_token_id,
        3: bart.unk_token_id,
    }
    for i in range(sp.get_piece_size()):
        if i in specials:
            expected = shared[specials[i]]
        else:
            piece = sp.id_to_piece(i)
            text = " " + piece[1:] if piece.startswith("\u2581") else piece
            ids = bart(text, add_special_tokens=False)["input_ids"]
            if not ids:
                continue
            expected = torch.stack([shared[j] for j in ids]).mean(0)
        assert torch.allclose(table[i], expected, atol=1e-6, rtol=0), (i, sp.id_to_piece(i))
    assert table.shape[0] >= sp.get_piece_size() + 1024
    extra = table[sp.get_piece_size() : sp.get_piece_size() + 1024]
    assert 0.01 < extra.std().item() < 0.03  # N(0, 0.02) init
    assert meta["mean_rows"] > 0 and meta["special_rows"] == 4


def test_token_map_is_cached(work, tmp_path):
    d = work["dir"]
    rc = convert_from_hf(
        [
            "--florence",
            str(d / "florence"),
            "--gemma-tokenizer",
            str(work["gtok"]),
            "--image-size",
            str(IMAGE),
            "--out",
            str(d / "ck_f2"),
        ]
    )
    assert rc == 0
    _, meta, _ = load_full_checkpoint(d / "ck_f2")
    assert meta["token_map_cached"] is True
    assert list(d.glob(".mmcap_token_map_*.npz"))


def _official_dir(work, name: str, out: Path) -> Path:
    """A tiny checkpoint in the official remote-code layout, built from SYSTEM.md's key names."""
    from mmcap.config.serialize import model_config_to_dict
    from mmcap.hf.florence2_keys import bart_to_hf
    from mmcap.hf.gemma2_keys import gemma2_to_hf
    from mmcap.model.vision import vision_to_hf

    cfg, _, full = load_full_checkpoint(work["dir"] / f"ck_{name}")
    g = torch.Generator().manual_seed(5)
    for k in full:
        if k.endswith(".gate"):
            full[k] = torch.randn(1, generator=g)  # make the cross-attention matter
    vision = {k[len("vision.") :]: v for k, v in full.items() if k.startswith("vision.")}
    sd = vision_to_hf(vision, "official")
    gemma = cfg.decoder.arch == "gemma2"
    sd.update(bart_to_hf(full, cfg, "official", with_decoder=not gemma))
    pre = "language_model.model.decoder."
    if gemma:
        dec = {k[len("decoder.") :]: v for k, v in full.items() if k.startswith("decoder.")}
        sd.update(
            gemma2_to_hf(
                dec,
                cfg.decoder,
                prefix=pre,
                with_xattn=True,
                lm_head="language_model.lm_head.weight",
            )
        )
    else:
        sd["language_model.lm_head.weight"] = sd[pre + "embed_tokens.weight"]
    v, e = model_config_to_dict(cfg)["vision"], cfg.encoder
    text = {
        "model_type": "florence2_language",
        "d_model": e.hidden_size,
        "encoder_layers": e.num_layers,
        "decoder_layers": cfg.decoder.num_layers,
        "encoder_attention_heads": e.num_attention_heads,
        "decoder_attention_heads": cfg.decoder.num_attention_heads,
        "encoder_ffn_dim": e.ffn_hidden_size,
        "decoder_ffn_dim": cfg.decoder.ffn_hidden_size,
        "max_position_embeddings": e.max_position_embeddings,
        "encoder_vocab_size": e.vocab_size,
        "vocab_size": cfg.decoder.vocab_size,
    }
    if gemma:
        gcfg = json.loads((work["dir"] / "gemma" / "config.json").read_text())
        text["gemma_config"] = {
            **gcfg,
            "encoder_hidden_size": e.hidden_size,
            "encoder_attn_every_x_layers": 1,
        }
    config = {
        "model_type": "florence2",
        "text_config": text,
        "vision_config": {
            "model_type": "davit",
            "dim_embed": v["embed_dim"],
            "depths": v["depths"],
            "num_heads": v["num_heads"],
            "num_groups": v["num_groups"],
            "patch_size": v["patch_size"],
            "patch_stride": v["patch_stride"],
            "patch_padding": v["patch_padding"],
            "patch_prenorm": v["patch_prenorm"],
            "window_size": v["window_size"],
            "projection_dim": v["projection_dim"],
            "image_pos_embed": {"type": "learned_abs_2d", "max_pos_embeddings": 50},
            "visual_temporal_embedding": {"type": "COSINE", "max_temporal_embeddings": 100},
        },
    }
    out.mkdir()
    (out / "config.json").write_text(json.dumps(config))
    from safetensors.torch import save_file

    save_file({k: t.clone().contiguous() for k, t in sd.items()}, str(out / "model.safetensors"))
    return out, full


@pytest.mark.parametrize("name", ["f", "g"])
def test_official_layout_imports_exactly(work, tmp_path, name):
    src, full = _official_dir(work, name, tmp_path / "official")
    assert (
        convert_from_hf(
            ["--official", str(src), "--image-size", str(IMAGE), "--out", str(tmp_path / "ck")]
        )
        == 0
    )
    _, _, got = load_full_checkpoint(tmp_path / "ck")
    assert set(got) == set(full)
    for k, v in full.items():
        assert torch.equal(got[k][: v.shape[0]], v), k
    pixels, prompt, mask, dec = _inputs(seed=2)
    a, _ = _mmcap_logits(tmp_path / "ck", pixels, prompt, mask, dec)
    b, _ = _mmcap_logits(work["dir"] / f"ck_{name}", pixels, prompt, mask, dec)
    if name == "g":  # the official copy has non-zero gates: only shapes agree
        assert a.shape == b.shape and not torch.allclose(a, b)
    else:
        assert torch.equal(a, b)


def test_official_leftover_tensor_is_an_error(work, tmp_path, capsys):
    src, _ = _official_dir(work, "f", tmp_path / "official")
    from safetensors.torch import save_file

    sd = load_file(str(src / "model.safetensors"))
    sd["language_model.model.decoder.layers.0.extra.weight"] = torch.zeros(2)
    save_file(sd, str(src / "model.safetensors"))
    assert convert_from_hf(["--official", str(src), "--out", str(tmp_path / "ck")]) == 1
    assert "land nowhere" in capsys.readouterr().err
    assert not (tmp_path / "ck").exists()


def test_bad_input_is_reported_and_leaves_nothing(work, tmp_path, capsys):
    d = work["dir"]
    broken = tmp_path / "broken"
    shutil.copytree(d / "florence", broken)
    (broken / "model.safetensors").write_bytes(b"\x00garbage")
    args = ["--gemma-tokenizer", str(work["gtok"]), "--out", str(tmp_path / "ck")]
    assert convert_from_hf(["--florence", str(broken), *args]) == 1
    assert "model.safetensors: cannot read safetensors" in capsys.readouterr().err
    (broken / "config.json").unlink()
    assert convert_from_hf(["--florence", str(broken), *args]) == 1
    assert "config.json: not found" in capsys.readouterr().err
    assert (
        convert_from_hf(["--florence", str(d / "florence"), *args, "--preset", "florence-2-large"])
        == 1
    )
    assert "does not fit the checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "ck").exists() and not list(tmp_path.glob("*.partial"))
    assert convert_to_hf(["--ckpt", str(tmp_path), "--out", str(tmp_path / "hf")]) == 1
    assert "not an mmcap checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
