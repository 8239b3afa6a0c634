"""Target (Gemma SentencePiece) and prompt (BART) tokenizers on tiny local models."""

import shutil

import numpy as np
import pytest

from mmcap.data.prompts import build_prompt
from mmcap.data.testing import build_tiny_gemma_tokenizer
from mmcap.data.tokenizers import PromptTokenizer, TargetTokenizer


def test_target_tokenizer_bos_eos_and_round_trip(loaded_tokenizers):
    target, _ = loaded_tokenizers
    texts = ["Das Bild zeigt einen Hund.", "图为一只狗。", "emoji 😀 and digits 2026"]
    ids = target.encode(texts)
    for text, x in zip(texts, ids):
        assert x.dtype == np.int32
        assert x[0] == 2 and x[-1] == 1  # <bos> ... <eos>
        assert not np.isin(x[1:-1], [0, 1, 2]).any()
        assert target.decode(x) == text  # byte fallback covers the emoji
    # Control strings in the text stay text (never become special ids).
    assert not np.isin(target.encode(["<eos> <bos>"])[0][1:-1], [0, 1, 2]).any()


def test_prompt_tokenizer_specials(loaded_tokenizers):
    _, prompt = loaded_tokenizers
    text = build_prompt("<LANG_DE><CAPTION>")
    (ids,) = prompt.encode([text])
    assert (prompt.bos_id, prompt.pad_id, prompt.eos_id) == (0, 1, 2)  # BART layout
    assert ids[0] == 0 and ids[-1] == 2
    assert prompt.decode(ids) == text


def test_hashes_are_content_hashes(tmp_path, tiny_tokenizers, loaded_tokenizers):
    gemma, bart = tiny_tokenizers
    target, prompt = loaded_tokenizers
    # Same bytes elsewhere -> same hash; the path does not matter.
    shutil.copytree(bart, tmp_path / "bart_copy")
    shutil.copy(gemma, tmp_path / "tokenizer.model")
    assert PromptTokenizer(tmp_path / "bart_copy").content_hash == prompt.content_hash
    assert TargetTokenizer(tmp_path / "tokenizer.model").content_hash == target.content_hash
    # Different model -> different hash.
    other = build_tiny_gemma_tokenizer(tmp_path / "other", vocab_size=550)
    assert TargetTokenizer(other).content_hash != target.content_hash
    config = tmp_path / "bart_copy" / "tokenizer_config.json"
    config.write_text(config.read_text().replace("1024", "512"))
    assert PromptTokenizer(tmp_path / "bart_copy").content_hash != prompt.content_hash
    assert len(target.content_hash) == 64


def test_wrong_special_ids_rejected(tmp_path):
    import io

    import sentencepiece as spm

    from mmcap.data.testing import _corpus

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(0)), model_writer=model, vocab_size=300, minloglevel=2
    )  # default ids: unk 0, bos 1, eos 2
    (tmp_path / "m.model").write_bytes(model.getvalue())
    with pytest.raises(ValueError, match="expected \\(0, 1, 2\\)"):
        TargetTokenizer(tmp_path / "m.model")
    with pytest.raises(FileNotFoundError):
        TargetTokenizer(tmp_path / "missing.model")
    with pytest.raises(FileNotFoundError):
        PromptTokenizer(tmp_path)
