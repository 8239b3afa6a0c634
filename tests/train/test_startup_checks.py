"""Checks made at startup, before a model is built: a dataset tokenized for a bigger
vocabulary than the model, datasets with different tokenizers, a truncated store file."""

from types import SimpleNamespace

import pytest

from mmcap.config import ConfigError, get_preset
from mmcap.data.compat import check_datasets_fit_model


def _ds(path, prompt_vocab, target_vocab, digest="a"):
    tok = {
        "prompt": {"kind": "RobertaTokenizer", "directory": "encoder", "vocab_size": prompt_vocab,
                   "sha256": digest},
        "target": {"kind": "sentencepiece", "file": "tokenizer.model", "vocab_size": target_vocab,
                   "sha256": digest},
    }
    return SimpleNamespace(path=path, manifest={"tokenizers": tok})


def test_dataset_tokenizer_larger_than_model_is_refused():
    model = get_preset("debug-gemma")
    ok = _ds("data/a", model.encoder.vocab_size, model.decoder.vocab_size)
    check_datasets_fit_model([ok], model)
    with pytest.raises(ConfigError) as e:
        check_datasets_fit_model([_ds("data/b", 51289, model.decoder.vocab_size)], model)
    msg = str(e.value)
    assert msg.startswith("data.train:") and "data/b" in msg and "encoder" in msg
    assert "model.encoder.vocab_size" in msg
    with pytest.raises(ConfigError, match="decoder target tokenizer of 256000"):
        check_datasets_fit_model([_ds("data/c", 10, 256000)], model, "data.valid")


def test_blended_datasets_need_the_same_tokenizers():
    model = get_preset("debug-gemma")
    a, b = _ds("data/a", 10, 10, "x"), _ds("data/b", 10, 10, "y")
    with pytest.raises(ConfigError, match="different encoder .BART. prompt tokenizers"):
        check_datasets_fit_model([a, b], model)


def test_truncated_store_is_flagged_at_open(tmp_path):
    from mmcap.data.indexed import CaptionDataset
    from mmcap.data.testing import write_synthetic_dataset

    path = write_synthetic_dataset(tmp_path / "d", 6, seed=1, prompt_vocab=50, target_vocab=50)
    CaptionDataset(path)
    images = path / "images.bin"
    with open(images, "r+b") as f:
        f.truncate(images.stat().st_size - 10)
    with pytest.raises(ValueError, match=r"images.bin: \d+ bytes, but its index needs"):
        CaptionDataset(path)
