"""tools/caption.py and tools/translate.py on a converted tiny checkpoint and on its HF export:
the same captions from both, with and without the zero-shot prefix; bad inputs are clear
errors naming the file."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mmcap.data.testing import build_tiny_bart_tokenizer, build_tiny_gemma_tokenizer
from mmcap.testing.hf_models import tiny_florence2
from tools.caption import main as caption
from tools.convert_from_hf import main as convert_from_hf
from tools.convert_to_hf import main as convert_to_hf
from tools.translate import main as translate

GEN = ["--beams", "2", "--max-new-tokens", "6", "--text-rows-only"]


@pytest.fixture(scope="module")
def work(tmp_path_factory, single_rank_parallel_state):
    d = tmp_path_factory.mktemp("gen_tools")
    tiny_florence2(0, image_token_id=999).save_pretrained(d / "florence")
    build_tiny_bart_tokenizer(d / "florence")
    gtok = build_tiny_gemma_tokenizer(d / "gemma_tok")
    args = ["--florence", str(d / "florence"), "--gemma-tokenizer", str(gtok)]
    assert convert_from_hf([*args, "--image-size", "64", "--out", str(d / "ck")]) == 0
    assert convert_to_hf(["--ckpt", str(d / "ck"), "--out", str(d / "hf")]) == 0
    rng = np.random.default_rng(0)
    images = []
    for i in range(2):
        path = d / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (80, 80, 3), dtype=np.uint8)).save(path)
        images.append(str(path))
    (d / "broken.jpg").write_bytes(b"not a jpeg")
    return d, images


@pytest.mark.parametrize("prefix", [[], ["--prefix"]])
def test_caption_checkpoint_equals_hf_export(work, capsys, prefix):
    d, images = work
    outs = []
    for model in ("ck", "hf"):
        rc = caption(["--ckpt", str(d / model), "--image", *images, "--lang", "de", *GEN, *prefix])
        assert rc == 0
        outs.append(capsys.readouterr().out.splitlines())
    assert len(outs[0]) == 2 and all(outs[0])  # text rows only: never empty here
    assert outs[0] == outs[1]


def test_translate_prints_one_line_per_input(work, capsys, tmp_path):
    d, _ = work
    src = tmp_path / "src.txt"
    src.write_text("A dog runs.\nTwo cats sleep.\nA red car.\n", encoding="utf-8")
    assert translate(["--ckpt", str(d / "ck"), "--lang", "fr", "--file", str(src), *GEN]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_bad_inputs_are_clear_errors(work, capsys, tmp_path):
    d, images = work
    rc = caption(["--ckpt", str(d / "ck"), "--image", str(d / "broken.jpg"), "--lang", "en", *GEN])
    assert rc == 2 and "broken.jpg" in capsys.readouterr().err
    assert caption(["--ckpt", str(tmp_path), "--image", *images, "--lang", "en"]) == 2
    assert "neither an mmcap checkpoint" in capsys.readouterr().err
    src = tmp_path / "gap.txt"
    src.write_text("One.\n\nThree.\n", encoding="utf-8")
    assert translate(["--ckpt", str(d / "ck"), "--lang", "fr", "--file", str(src)]) == 2
    assert "line(s) [2]" in capsys.readouterr().err
