"""tools/train_tokenizers.py: both tokenizers trained on a tiny corpus of the supported inputs
(official tar, JSONL, .txt), loadable by mmcap's tokenizer classes and by preprocessing, with
clear errors for what cannot work."""

from __future__ import annotations

import json
import random

import pytest

from mmcap.data.testing import make_jpeg, synthetic_entries, write_jsonl, write_official_tar
from tools.train_tokenizers import main as train_tokenizers

KEYS = ["caption-en", "caption-de", "translation-fr", "translation-zh", "translation-ru"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok_inputs")
    rng = random.Random(0)
    samples = [
        (f"k{i}", make_jpeg(i, (32, 32)), json.dumps(synthetic_entries(rng, KEYS)).encode())
        for i in range(60)
    ]
    write_official_tar(d / "a.tar", samples)
    (d / "img.jpg").write_bytes(make_jpeg(99, (32, 32)))
    lines = [
        {"id": f"j{i}", "image": "img.jpg", **e}
        for i in range(60)
        for e in synthetic_entries(rng, ["caption-es"])
    ]
    write_jsonl(d / "b.jsonl", lines)
    (d / "extra.txt").write_text("Ein ganz eigener Satz.\nUne phrase à part.\n", encoding="utf-8")
    return d


def test_trains_both_tokenizers_that_preprocessing_uses(inputs, tmp_path, capsys):
    from mmcap.data.preprocess import preprocess
    from mmcap.data.tokenizers import PromptTokenizer, TargetTokenizer

    out = tmp_path / "tok"
    argv = ["--input", str(inputs / "*.tar"), str(inputs / "b.jsonl"), str(inputs / "extra.txt")]
    argv += ["--out", str(out), "--encoder-vocab-size", "420", "--decoder-vocab-size", "380"]
    assert train_tokenizers(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["decoder_vocab_size"] == 380 and summary["encoder_vocab_size"] <= 420
    assert summary["target_texts"] == 60 * len(KEYS) + 60 + 2
    enc, dec = PromptTokenizer(out / "encoder"), TargetTokenizer(out / "decoder" / "tokenizer.model")
    assert (enc.bos_id, enc.pad_id, enc.eos_id) == (0, 1, 2)  # BART layout
    prompt = "The target language is Russian. Translate the following text: A dog."
    assert enc.decode(enc.encode([prompt])[0]) == prompt
    text = "На картинке изображен собака 123."
    ids = dec.encode([text])[0]
    assert ids[0] == 2 and ids[-1] == 1 and dec.decode(ids) == text
    data = tmp_path / "data"
    manifest = preprocess(
        [str(inputs / "b.jsonl")], summary["gemma_tokenizer"], summary["encoder_tokenizer"],
        str(data), show_progress=False,
    )  # fmt: skip
    assert manifest["counts"]["entries"] == 60
    assert manifest["tokenizers"]["target"]["vocab_size"] == 380


def test_bad_requests_are_clear_errors(inputs, tmp_path, capsys):
    base = ["--input", str(inputs / "b.jsonl"), "--out", str(tmp_path / "t")]
    assert train_tokenizers([*base, "--decoder-vocab-size", "100000"]) == 1
    err = capsys.readouterr().err
    assert "--decoder-vocab-size" in err and "Vocabulary size too high" in err
    assert not (tmp_path / "t").exists() and not list(tmp_path.glob(".t.tmp-*"))
    assert train_tokenizers([*base, "--encoder-vocab-size", "100"]) == 1
    assert ">= 300" in capsys.readouterr().err
    assert train_tokenizers(["--input", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "x")]) == 1
    assert "matches no file" in capsys.readouterr().err
    (tmp_path / "t").mkdir()
    assert train_tokenizers([*base, "--decoder-vocab-size", "300"]) == 1
    assert "--overwrite" in capsys.readouterr().err


def test_preprocess_help_points_to_the_schema_and_the_tokenizer_tool(capsys):
    from pathlib import Path

    from tools.preprocess_data import main as preprocess_main

    with pytest.raises(SystemExit):
        preprocess_main(["--help"])
    out = capsys.readouterr().out
    assert "docs/data.md" in out and "tools/train_tokenizers.py" in out and '"image"' in out
    repo = Path(__file__).resolve().parents[2]
    assert (repo / "docs" / "data.md").is_file() and (repo / "tools" / "train_tokenizers.py").is_file()
